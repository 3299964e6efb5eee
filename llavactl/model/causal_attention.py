"""Causal self-attention on a CPU in query chunks: most pairs above the diagonal skipped.

torch's CPU flash kernel walks the keys in blocks of 512 and, under `is_causal`, skips only the
blocks that lie wholly above the diagonal: at 704 tokens the first 512 queries each compute all
512 keys of the first block, 1.6 times the causal pairs. Here the queries go to the same kernel in
chunks, each chunk against the keys up to its own last query with the diagonal masked. Every query
still sees all its keys in one call, so the results are the kernel's (no partial softmaxes to
merge). Smaller chunks skip more pairs but make more, smaller calls, and the backward adds each
chunk's key and value gradients into the whole's; the sizes are the fastest measured, interleaved
runs on 2 cores, 9 heads of 64 (local_lite's LLM), milliseconds:

    tokens          256    512    704   1024   1536
    forward  torch  1.07   4.03   6.08  10.74  21.34
    chunks of 64    0.95   3.06   5.34  10.53  23.03
    backward torch  2.30   9.38  14.02  28.31  56.09
    chunks of 192   2.11   7.44  12.51  25.39  55.20

Past 1024 tokens the kernel's own blocking wins or ties, and the whole sequence is one call.

The two passes are custom ops (``llavactl::causal_attention`` and its backward) so that torch's
FLOP counter sees one causal attention, credited with the causal pairs (:mod:`llavactl.model.flops`),
not the chunks' masked calls, and so that fake tensors trace them.
"""

from __future__ import annotations

import torch

# Query rows per kernel call, and the longest sequence that is chunked (see the table above).
FORWARD_CHUNK, BACKWARD_CHUNK, LONGEST_CHUNKED = 64, 192, 1024

# One additive causal mask per dtype (0 on and below the diagonal, -inf above), as large as the
# longest sequence yet; a chunk reads its rows and keys as a view. The kernel takes masks only in the
# query's dtype.
_masks: dict[torch.dtype, torch.Tensor] = {}


def chunks(length: int, size: int) -> list[tuple[int, int]]:
    """The query rows ``[start, end)`` of each kernel call for a sequence of ``length`` tokens."""
    if length > LONGEST_CHUNKED:
        return [(0, length)]
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def _causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    mask = _masks.get(dtype)
    if mask is None or mask.shape[0] < length:
        mask = torch.full((length, length), float("-inf"), dtype=dtype).triu_(1)
        _masks[dtype] = mask
    return mask


def _chunk_mask(start: int, end: int, length: int, dtype: torch.dtype) -> torch.Tensor | None:
    # The first chunk starts at the diagonal's top: the kernel's own (top-left) causal mask fits it.
    return None if start == 0 else _causal_mask(length, dtype)[start:end, :end]


@torch.library.custom_op("llavactl::causal_attention", mutates_args=(), device_types="cpu")
def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over ``(batch, heads, tokens, head_dim)`` tensors of one dtype, as many key/value
    heads as query heads: the output (laid out as the kernel lays it, tokens before heads) and the
    log-sum-exp of each query's scores (float32), which the backward needs."""
    batch, heads, length, _ = query.shape
    out = query.new_empty(batch, length, heads, value.shape[-1]).transpose(1, 2)
    lse = query.new_empty(batch, heads, length, dtype=torch.float32)
    for start, end in chunks(length, FORWARD_CHUNK):
        chunk_out, chunk_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query[:, :, start:end],
            key[:, :, :end],
            value[:, :, :end],
            0.0,
            start == 0,
            attn_mask=_chunk_mask(start, end, length, query.dtype),
            scale=scale,
        )
        out[:, :, start:end] = chunk_out
        lse[:, :, start:end] = chunk_lse
    return out, lse


@causal_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, length, _ = query.shape
    out = query.new_empty(batch, length, heads, value.shape[-1]).transpose(1, 2)
    return out, query.new_empty(batch, heads, length, dtype=torch.float32)


@torch.library.custom_op("llavactl::causal_attention_backward", mutates_args=(), device_types="cpu")
def causal_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`causal_attention` for its query, key and value."""
    length = query.shape[2]
    grad_query = torch.empty_like(query)
    # Every chunk's keys start at 0: their gradients add up over the chunks.
    grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
    for start, end in chunks(length, BACKWARD_CHUNK):
        chunk_query, chunk_key, chunk_value = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out[:, :, start:end],
            query[:, :, start:end],
            key[:, :, :end],
            value[:, :, :end],
            out[:, :, start:end],
            lse[:, :, start:end],
            0.0,
            start == 0,
            attn_mask=_chunk_mask(start, end, length, query.dtype),
            scale=scale,
        )
        grad_query[:, :, start:end] = chunk_query
        grad_key[:, :, :end] += chunk_key
        grad_value[:, :, :end] += chunk_value
    return grad_query, grad_key, grad_value


@causal_attention_backward.register_fake
def _(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    query, key, value, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.scale = scale


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    query, key, value, out, lse = ctx.saved_tensors
    grads = causal_attention_backward(grad_out, query, key, value, out, lse, ctx.scale)
    return *grads, None


causal_attention.register_autograd(_backward, setup_context=_setup_context)
