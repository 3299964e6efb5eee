"""The LLM's attention on a CPU: key/value groups repeated for training, the same results as
transformers' SDPA."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llavactl.model import attention
from tests.test_model_assembly import tiny


def gqa_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def loss_and_grads(model: LlamaForCausalLM, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, bool]]:
    """(query heads, key heads, enable_gqa) of each SDPA call."""
    calls: list[tuple[int, int, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(query, key, value, *args, **kwargs):
        calls.append((query.shape[1], key.shape[1], kwargs.get("enable_gqa", False)))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    return calls


@pytest.mark.parametrize("padded", [False, True])
def test_training_repeats_the_groups_with_sdpa_s_results(padded: bool, sdpa_calls: list):
    ids = torch.randint(0, 64, (2 if padded else 1, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 8:] = 0  # a padded batch: the masked path
    batch = {"input_ids": ids, "attention_mask": mask}
    reference = gqa_llama()
    ours = copy.deepcopy(reference)
    attention.use_for(ours.config)
    assert ours.config._attn_implementation == attention.NAME
    expected_loss, expected_grads = loss_and_grads(reference, batch)
    # transformers' own SDPA keeps the 2 key/value heads for the kernel, unless there is a mask.
    assert sdpa_calls[0][1:] == ((4, False) if padded else (2, True))
    sdpa_calls.clear()
    loss, grads = loss_and_grads(ours, batch)
    assert sdpa_calls == [(4, 4, False)] * 2  # one call per layer, the groups repeated
    torch.testing.assert_close(loss, expected_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)


def test_without_grad_the_groups_stay_for_the_kernel(sdpa_calls: list):
    model = gqa_llama()
    attention.use_for(model.config)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 5, dtype=torch.long))
    assert sdpa_calls == [(4, 2, True)] * 2


def test_another_implementation_is_left_alone():
    config = LlamaConfig(attn_implementation="eager")
    attention.use_for(config)
    assert config._attn_implementation == "eager"


def test_assembled_llm_uses_it_and_checkpoints_do_not_name_it(tmp_path):
    from llavactl.model.assembly import build_llava

    assembled = build_llava(tiny(), "lora", image_size=None, seed=0)
    assert assembled.model.model.language_model.config._attn_implementation == attention.NAME
    assembled.model.config.save_pretrained(tmp_path)
    assert attention.NAME not in (tmp_path / "config.json").read_text()
