"""The LLM's attention on a CPU: key/value groups repeated for training, causal attention in query
chunks, the same results as transformers' SDPA."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_config as tiny
from transformers import LlamaConfig, LlamaForCausalLM

from llavactl.model import attention
from llavactl.model.causal_attention import BACKWARD_CHUNK, FORWARD_CHUNK, LONGEST_CHUNKED, causal_attention, chunks
from llavactl.model.flops import flop_counter


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


@pytest.fixture
def chunked_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(query heads, key heads) of each call of the chunked causal attention."""
    import llavactl.model.causal_attention as module

    calls: list[tuple[int, int]] = []
    op = module.causal_attention

    def recorded(query, key, value, scale, lengths=None):
        calls.append((query.shape[1], key.shape[1]))
        return op(query, key, value, scale, lengths)

    monkeypatch.setattr(module, "causal_attention", recorded)
    return calls


@pytest.mark.parametrize("padded", [False, True])
def test_training_repeats_the_groups_with_sdpa_s_results(padded: bool, sdpa_calls: list, chunked_calls: list):
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
    # One call per layer: the lone record chunked, its 2 key/value heads shared by their groups; the
    # masked batch through SDPA, the groups repeated.
    assert (chunked_calls, sdpa_calls) == (([(4, 2)] * 2, []) if not padded else ([], [(4, 4, False)] * 2))
    torch.testing.assert_close(loss, expected_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)


def test_without_grad_the_groups_stay_for_the_kernel(sdpa_calls: list, chunked_calls: list):
    model = gqa_llama()
    attention.use_for(model.config)
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 5, dtype=torch.long))
    assert sdpa_calls == [(4, 2, True)] * 2
    assert chunked_calls == []


# Lengths on and around the chunks' edges, one chunk only, and past the longest that is chunked.
LENGTHS = [1, 2, FORWARD_CHUNK - 1, FORWARD_CHUNK, FORWARD_CHUNK + 1, BACKWARD_CHUNK + 7, 333, LONGEST_CHUNKED + 3]


@pytest.mark.parametrize("length", LENGTHS)
def test_chunked_causal_attention_is_sdpa_s_causal_attention(length: int):
    generator = torch.Generator().manual_seed(length)
    # Laid out as the LLM's projections give them: tokens before heads.
    query, key, value = (torch.randn(2, length, 3, 16, generator=generator).transpose(1, 2) for _ in range(3))
    grad_out = torch.randn(2, 3, length, 16, generator=generator)
    leaves = [t.requires_grad_() for t in (query, key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.3)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    out, _ = causal_attention(query, key, value, 0.3)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(torch.autograd.grad(out, leaves, grad_out), expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("batch", [1, 3])
def test_grouped_query_heads_share_their_key_value_heads(batch: int):
    generator = torch.Generator().manual_seed(batch)
    query = torch.randn(batch, 300, 6, 16, generator=generator).transpose(1, 2)  # 6 query heads
    key, value = (torch.randn(batch, 300, 2, 16, generator=generator).transpose(1, 2) for _ in range(2))  # 2 shared
    grad_out = torch.randn(batch, 6, 300, 16, generator=generator)
    leaves = [t.requires_grad_() for t in (query, key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    out, _ = causal_attention(query, key, value, 16**-0.5)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_chunks_cover_the_queries_once_in_order():
    assert chunks(130, 64) == [(0, 64), (64, 128), (128, 130)]
    assert chunks(64, 64) == [(0, 64)]
    assert chunks(LONGEST_CHUNKED + 1, 64) == [(0, LONGEST_CHUNKED + 1)]  # the kernel's own blocking wins there


def test_chunked_attention_in_bf16_matches_sdpa_in_bf16():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 4, 300, 32, generator=generator, dtype=torch.bfloat16) for _ in range(3))
    leaves = [t.requires_grad_() for t in (query, key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
    out, _ = causal_attention(query, key, value, 32**-0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    expected_grads = torch.autograd.grad(expected.float().square().sum(), leaves)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=0.05, rtol=0.02)


def test_the_flop_counter_credits_chunked_attention_as_the_causal_kernel():
    query, key, value = (torch.randn(1, 3, 200, 16, requires_grad=True) for _ in range(3))

    def counted(attend) -> int:
        counter = flop_counter()
        with counter:
            attend().sum().backward()
        return counter.get_total_flops()

    chunked = counted(lambda: causal_attention(query, key, value, 0.25)[0])
    kernel = counted(lambda: torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True))
    # 200 * 201 / 2 query-key pairs, 3 heads of 16: (16 + 16) a pair forward, (3 * 16 + 2 * 16) backward.
    assert chunked == kernel == 2 * 3 * 20100 * (32 + 80)


def test_training_under_cpu_bf16_autocast_takes_the_chunked_path(chunked_calls: list):
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(2))
    reference = gqa_llama()
    ours = copy.deepcopy(reference)
    attention.use_for(ours.config)
    losses = []
    for model in (reference, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    assert chunked_calls == [(4, 2)] * 2
    torch.testing.assert_close(losses[1], losses[0])
    for (name, expected), got in zip(reference.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, atol=1e-3, rtol=0.02, msg=name)


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


def test_fake_tensors_trace_the_chunked_attention_with_the_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def shapes() -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        query = torch.randn(2, 70, 4, 8).transpose(1, 2).requires_grad_()
        key, value = (torch.randn(2, 70, 2, 8).transpose(1, 2).requires_grad_() for _ in range(2))
        out, lse = causal_attention(query, key, value, 0.5)
        out.sum().backward()
        return [(t.shape, t.stride()) for t in (out, lse, query.grad, key.grad, value.grad)]

    real = shapes()
    with FakeTensorMode():
        assert shapes() == real


@pytest.mark.slow
def test_the_ops_pass_torch_s_custom_op_checks():
    # Fake implementations with the real shapes and strides, autograd registration, schema.
    import llavactl.model.causal_attention as module

    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 150, 4, 8, generator=generator).transpose(1, 2).requires_grad_()
    key, value = (torch.randn(2, 150, 2, 8, generator=generator).transpose(1, 2).requires_grad_() for _ in range(2))
    torch.library.opcheck(module.causal_attention, (query, key, value, 0.3))
    out, lse = module.causal_attention(query, key, value, 0.3)
    grad_out = torch.randn(2, 4, 150, 8, generator=generator)
    backward_args = (grad_out, query.detach(), key.detach(), value.detach(), out.detach(), lse, 0.3)
    torch.library.opcheck(module.causal_attention_backward, backward_args)


def test_inputs_whose_last_dimension_is_strided_give_sdpa_s_results():
    generator = torch.Generator().manual_seed(4)
    query, key, value = (torch.randn(1, 2, 100, 16, generator=generator)[..., ::2] for _ in range(3))
    out, _ = causal_attention(query, key, value, 0.35)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.35)
    torch.testing.assert_close(out, expected)


def test_the_log_sum_exp_is_no_result_to_differentiate():
    query, key, value = (torch.randn(1, 2, 70, 8, requires_grad=True) for _ in range(3))
    out, lse = causal_attention(query, key, value, 0.35)
    assert out.requires_grad and not lse.requires_grad


def test_fp64_training_keeps_sdpa(chunked_calls: list):
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(5))
    reference = gqa_llama().double()
    ours = copy.deepcopy(reference)
    attention.use_for(ours.config)
    expected_loss, expected_grads = loss_and_grads(reference, {"input_ids": ids})
    loss, grads = loss_and_grads(ours, {"input_ids": ids})
    assert chunked_calls == []
    torch.testing.assert_close(loss, expected_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=name)
