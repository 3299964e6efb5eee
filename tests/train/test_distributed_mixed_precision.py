"""FSDP2 with `training.bf16`: decoder layers compute with bf16 parameters while the shards, and so the
optimizer and the reduced gradients, stay fp32. Checked in one CPU process over gloo."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch

from llavactl.config.loader import load_profile
from llavactl.model.assembly import build_llava
from llavactl.train import distributed
from llavactl.train.loss import TokenLoss


@pytest.fixture
def gloo_group() -> Iterator[None]:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded_tiny(bf16: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[torch.dtype]]:
    """The tiny model sharded by `_fully_shard`, a batch for it, and the list its first decoder layer's
    q_proj appends the dtype of the weight it computes with to."""
    profile = load_profile("tiny", []).profile
    assembled = build_llava(profile.model, profile.stage, image_size=profile.data.image_size, seed=0)
    seen: list[torch.dtype] = []
    q_proj = assembled.model.model.language_model.layers[0].self_attn.q_proj
    q_proj.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    wrapped = distributed._fully_shard(TokenLoss(assembled.model), bf16=bf16)
    image_tokens = assembled.image_spec.num_tokens
    ids = torch.randint(3, 200, (2, image_tokens + 12), generator=torch.Generator().manual_seed(0))
    ids[:, 1 : 1 + image_tokens] = assembled.image_token_id
    labels = ids.clone()
    labels[:, : 1 + image_tokens] = -100
    side = assembled.image_spec.size
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1)),
    }
    return wrapped, batch, seen


@pytest.mark.usefixtures("gloo_group")
def test_fsdp_with_bf16_computes_in_bf16_and_keeps_fp32_shards_and_gradients() -> None:
    wrapped, batch, seen = _sharded_tiny(bf16=True)
    loss = wrapped(batch)
    loss.backward()
    assert seen == [torch.bfloat16]
    assert torch.isfinite(loss)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.grad.dtype for p in trainable if p.grad is not None} == {torch.float32}


@pytest.mark.usefixtures("gloo_group")
def test_fsdp_without_bf16_computes_in_fp32() -> None:
    wrapped, batch, seen = _sharded_tiny(bf16=False)
    wrapped(batch).backward()
    assert seen == [torch.float32]
