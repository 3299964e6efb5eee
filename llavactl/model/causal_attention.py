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

Records packed end to end in one row (``data.padding_free``) are separate sequences: given their
lengths, each record's queries see only that record's keys, in the same chunks, so no pair across
records is computed at all (a masked SDPA call would compute every pair of the row).

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
        mask = torch.full((length, length), float("-inf"), dtype=dtype, device="cpu").triu_(1)
        _masks[dtype] = mask
    return mask


def segments(length: int, lengths: list[int]) -> list[tuple[int, int]]:
    """The ``(offset, length)`` of each sequence of a row of ``length`` tokens: the packed records of
    ``lengths``, or the whole row when ``lengths`` is empty."""
    if not lengths:
        return [(0, length)]
    if sum(lengths) != length or min(lengths) < 1:
        raise ValueError(f"record lengths {lengths} do not add up to the row's {length} tokens")
    offsets = [0]
    for n in lengths[:-1]:
        offsets.append(offsets[-1] + n)
    return list(zip(offsets, lengths, strict=True))


def _chunk_mask(start: int, end: int, length: int, dtype: torch.dtype) -> torch.Tensor | None:
    # The first chunk starts at the diagonal's top: the kernel's own (top-left) causal mask fits it.
    return None if start == 0 else _causal_mask(length, dtype)[start:end, :end]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernel's log-sum-exp dtype: its accumulation type."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_stride(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The kernel reads the last dimension as contiguous without checking (SDPA checks before calling it)."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _grouped(tensor: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """One record's ``(heads, tokens, dim)`` as ``(kv_heads, group, tokens, dim)``: the kernel's batch and
    heads, so that each key/value head serves its group of query heads without being copied."""
    return tensor.view(kv_heads, tensor.shape[0] // kv_heads, *tensor.shape[1:])


def _shared(tensor: torch.Tensor, group: int) -> torch.Tensor:
    """One record's key or value ``(kv_heads, tokens, dim)``, seen by every query head of its group."""
    return tensor.unsqueeze(1).expand(-1, group, -1, -1)


@torch.library.custom_op("llavactl::causal_attention", mutates_args=(), device_types="cpu")
def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, lengths: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over ``(batch, heads, tokens, head_dim)`` tensors of one dtype; key and value
    may have fewer heads, each shared by a group of query heads (grouped-query attention). ``lengths``:
    the records packed in each row, end to end, each attending only to itself (none or empty: the row
    is one sequence). Returns the output (laid out as the kernel lays it, tokens before heads) and the
    log-sum-exp of each query's scores (float32, or float64 for float64 inputs), which the backward
    needs."""
    query, key, value = _unit_stride(query, key, value)
    batch, heads, length, _ = query.shape
    kv_heads = key.shape[1]
    out = query.new_empty(batch, length, heads, value.shape[-1]).transpose(1, 2)
    lse = query.new_empty(batch, heads, length, dtype=_lse_dtype(query.dtype))
    for b in range(batch):
        q, o, m = _grouped(query[b], kv_heads), _grouped(out[b], kv_heads), _grouped(lse[b], kv_heads)
        k, v = _shared(key[b], q.shape[1]), _shared(value[b], q.shape[1])
        for offset, n in segments(length, lengths or []):
            for start, end in chunks(n, FORWARD_CHUNK):
                rows, keys = slice(offset + start, offset + end), slice(offset, offset + end)
                chunk_out, chunk_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q[:, :, rows],
                    k[:, :, keys],
                    v[:, :, keys],
                    0.0,
                    start == 0,
                    attn_mask=_chunk_mask(start, end, n, query.dtype),
                    scale=scale,
                )
                o[:, :, rows] = chunk_out
                m[:, :, rows] = chunk_lse
    return out, lse


@causal_attention.register_fake
def _(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, lengths: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, length, _ = query.shape
    out = query.new_empty(batch, length, heads, value.shape[-1]).transpose(1, 2)
    return out, query.new_empty(batch, heads, length, dtype=_lse_dtype(query.dtype))


@torch.library.custom_op("llavactl::causal_attention_backward", mutates_args=(), device_types="cpu")
def causal_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    lengths: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`causal_attention` for its query, key and value."""
    query, key, value, out = _unit_stride(query, key, value, out)
    batch, heads, length, _ = query.shape
    kv_heads, group = key.shape[1], heads // key.shape[1]
    grad_query = torch.empty_like(query)
    # Every chunk's keys start at 0, and a group's query heads share theirs: the key and value
    # gradients add up over the chunks, then over the group.
    grad_key = key.new_zeros(batch, kv_heads, group, length, key.shape[-1])
    grad_value = value.new_zeros(batch, kv_heads, group, length, value.shape[-1])
    for b in range(batch):
        q, o, m = _grouped(query[b], kv_heads), _grouped(out[b], kv_heads), _grouped(lse[b], kv_heads)
        k, v = _shared(key[b], group), _shared(value[b], group)
        grad_o, grad_q = _grouped(grad_out[b], kv_heads), _grouped(grad_query[b], kv_heads)
        for offset, n in segments(length, lengths or []):
            for start, end in chunks(n, BACKWARD_CHUNK):
                rows, keys = slice(offset + start, offset + end), slice(offset, offset + end)
                chunk_query, chunk_key, chunk_value = (
                    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                        grad_o[:, :, rows],
                        q[:, :, rows],
                        k[:, :, keys],
                        v[:, :, keys],
                        o[:, :, rows],
                        m[:, :, rows],
                        0.0,
                        start == 0,
                        attn_mask=_chunk_mask(start, end, n, query.dtype),
                        scale=scale,
                    )
                )
                grad_q[:, :, rows] = chunk_query
                grad_key[b, :, :, keys] += chunk_key
                grad_value[b, :, :, keys] += chunk_value
    if group == 1:
        return grad_query, grad_key.squeeze(2), grad_value.squeeze(2)
    return grad_query, grad_key.sum(2), grad_value.sum(2)


@causal_attention_backward.register_fake
def _(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # As the real one returns them: the query's gradient laid out as the query, the others contiguous.
    return torch.empty_like(query), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    query, key, value, scale, lengths = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.mark_non_differentiable(lse)  # an output for the backward, not a result to differentiate
    ctx.scale = scale
    ctx.lengths = lengths


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
    query, key, value, out, lse = ctx.saved_tensors
    grads = causal_attention_backward(grad_out, query, key, value, out, lse, ctx.scale, ctx.lengths)
    return *grads, None, None


causal_attention.register_autograd(_backward, setup_context=_setup_context)
