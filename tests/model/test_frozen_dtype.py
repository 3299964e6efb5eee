"""Frozen weights are stored in the step's autocast dtype; trainable ones stay fp32 master weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import profile, tiny_config
from safetensors.torch import load_file

from llavactl.model.assembly import build_llava, component
from llavactl.plan import build as plan
from llavactl.plan.memory import weight_bytes
from llavactl.resolve import resolve
from llavactl.resolve.facts import probe


@pytest.mark.parametrize("stage", ["projector", "lora", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_frozen_weight_is_in_the_compute_dtype_and_every_trainable_one_fp32(
    stage: str, dtype: torch.dtype
) -> None:
    assembled = build_llava(tiny_config(), stage, image_size=None, seed=0, compute_dtype=dtype)
    norms = {
        f"{m}.{p}"
        for m, module in assembled.model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for p, _ in module.named_parameters(recurse=False)
    }
    for name, parameter in assembled.model.named_parameters():
        # LayerNorm weights stay fp32 (store_frozen_in says why): a few thousand a layer.
        expected = torch.float32 if parameter.requires_grad or name in norms else dtype
        assert parameter.dtype == expected, (name, parameter.dtype)
    assert norms and sum(assembled.model.get_parameter(n).numel() for n in norms) < 0.02 * sum(
        p.numel() for p in assembled.model.parameters()
    )
    frozen_parts = {component(n) for n, p in assembled.model.named_parameters() if not p.requires_grad}
    trained_parts = {component(n) for n, p in assembled.model.named_parameters() if p.requires_grad}
    assert frozen_parts == ({"vision_tower"} if stage == "full" else {"vision_tower", "llm"})
    assert (
        trained_parts
        == {"projector": {"projector"}, "lora": {"projector", "lora"}, "full": {"projector", "llm"}}[stage]
    )


def test_an_fp32_run_keeps_every_weight_in_fp32() -> None:
    assembled = build_llava(tiny_config(), "lora", image_size=None, seed=0)
    assert {p.dtype for p in assembled.model.parameters()} == {torch.float32}


def test_the_plans_weights_term_counts_frozen_weights_in_bf16() -> None:
    bf16 = plan.build_meta(profile("pretrain").profile, gradient_checkpointing=False)
    fp32 = plan.build_meta(profile("pretrain", "training.bf16=false").profile, gradient_checkpointing=False)
    params = list(bf16.model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    in_fp32 = sum(p.numel() for p in params if not p.requires_grad and p.dtype == torch.float32)  # LayerNorms
    assert in_fp32 < 1e-4 * frozen
    assert weight_bytes(bf16) == 4 * trainable + 2 * (frozen - in_fp32) + 4 * in_fp32
    assert 13.0 < weight_bytes(bf16) / 2**30 < 13.4
    assert weight_bytes(fp32) == 4 * (trainable + frozen)


@pytest.mark.slow
def test_a_cpu_bf16_run_resumes_exactly_with_its_frozen_weights_in_bf16(tmp_path: Path) -> None:
    """bf16 autocast on a CPU (resolved as on a CPU with AMX, so that any CPU runs the test): 6
    steps straight, and the same run resumed from its step-3 checkpoint, give the same losses and
    the same weights, bit for bit."""
    import shutil

    from rich.console import Console

    from llavactl.train.progress import TrainingProgress
    from llavactl.train.recipe import TrainRecipe

    facts = replace(probe(), cpu_flags=frozenset({"amx_bf16"}))
    extra = ["stage=lora", "training.bf16=true", "training.max_steps=6", "training.save_steps=3"]
    extra += ["training.save_total_limit=null"]

    def train(out: Path, resume: str | None = None) -> tuple[list[float], set[torch.dtype]]:
        loaded = profile("tiny", *extra, f"training.output_dir={out}")
        with TrainingProgress(Console(quiet=True), quiet=True) as progress:
            recipe = TrainRecipe(loaded, progress, resume=resume, resolved=resolve(loaded, facts))
            result = recipe.run()
        frozen = {p.dtype for p in recipe._assembled.model.parameters() if not p.requires_grad and p.dim() > 1}
        return result.losses, frozen

    straight, frozen = train(tmp_path / "whole")
    assert frozen == {torch.bfloat16} and len(straight) == 6  # every frozen matrix; LayerNorms stay fp32
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    resumed, _ = train(tmp_path / "split", resume=str(tmp_path / "split" / "checkpoint-3"))
    assert resumed == straight[3:]
    a = load_file(tmp_path / "whole" / "checkpoint-6" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoint-6" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
