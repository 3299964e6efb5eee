"""Counting a training step's FLOPs: torch's FlopCounterMode, taught the CPU attention kernels.

torch's counter knows the CUDA attention kernels but not `_scaled_dot_product_flash_attention_for_cpu`
and its backward, which is what `scaled_dot_product_attention` runs on a CPU: left alone it counts
local_lite's attention (the tower's 24 layers of 577 tokens, the LLM's 30 of 704) as nothing, about
90 GFLOP of a 750 GFLOP step. Counted here as torch counts the CUDA kernels' (the matmuls of
scores and outputs, five in the backward), except that a causal kernel is credited only with the
query-key pairs it computes (about half), where torch counts every pair.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.utils.flop_counter import FlopCounterMode


def attention_pairs(queries: int, keys: int, is_causal: bool) -> int:
    """Query-key pairs an attention kernel computes; causal masks align top-left, as torch's do
    (query i sees keys 0..i)."""
    if not is_causal:
        return queries * keys
    diagonal = min(queries, keys)
    return diagonal * (diagonal + 1) // 2 + (queries - diagonal) * keys


def _cpu_flash_forward(
    query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...], dropout_p: float = 0.0,
    is_causal: bool = False, *args: Any, **kwargs: Any,
) -> int:
    batch, heads, queries, head_dim = query
    pairs = attention_pairs(queries, key[2], is_causal)
    # scores = q @ k^T, then out = scores @ v; grouped-query k/v are shared, the work is per query head
    return 2 * batch * heads * pairs * (head_dim + value[3])


def _cpu_flash_backward(
    grad_out: tuple[int, ...], query: tuple[int, ...], key: tuple[int, ...], value: tuple[int, ...],
    out: tuple[int, ...], logsumexp: tuple[int, ...], dropout_p: float = 0.0, is_causal: bool = False,
    *args: Any, **kwargs: Any,
) -> int:
    batch, heads, queries, head_dim = query
    pairs = attention_pairs(queries, key[2], is_causal)
    # scores recomputed (q k^T), grad scores (dout v^T), grad v (p^T dout), grad q (ds k), grad k (ds^T q)
    return 2 * batch * heads * pairs * (3 * head_dim + 2 * value[3])


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention; use it as a context manager."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
        },
    )
