"""Counting a training step's FLOPs: torch's FlopCounterMode, taught the CPU attention kernels.

torch's counter knows the CUDA attention kernels but not `_scaled_dot_product_flash_attention_for_cpu`
and its backward, which is what `scaled_dot_product_attention` runs on a CPU: left alone it counts
local_lite's attention (the tower's 24 layers of 577 tokens, the LLM's 30 of 704) as nothing, about
90 GFLOP of a 750 GFLOP step. Counted here as torch counts the CUDA kernels' (the matmuls of
scores and outputs, five in the backward), except that a causal kernel is credited only with the
query-key pairs it computes (about half), where torch counts every pair. llavactl's own chunked
causal attention (:mod:`llavactl.model.causal_attention`) is credited with the causal pairs too,
not with the chunks' masked calls (which compute about a tenth more).
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


def flop_counter(*, masked_attention_is_causal: bool = False) -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention; use it as a context manager.

    ``masked_attention_is_causal`` counts attention under an explicit mask as causal: for a trace
    on fake tensors of a batch whose real mask transformers would drop for the causal kernel."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def pairs(query: tuple[int, ...], key: tuple[int, ...], is_causal: bool, mask: object) -> int:
        causal = is_causal or (masked_attention_is_causal and mask is not None)
        return attention_pairs(query[2], key[2], causal)

    def forward(
        query: tuple[int, ...],
        key: tuple[int, ...],
        value: tuple[int, ...],
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *args: Any,
        attn_mask: object = None,
        **kwargs: Any,
    ) -> int:
        # scores = q @ k^T, then out = scores @ v; grouped-query k/v are shared, the work is per query head
        return 2 * query[0] * query[1] * pairs(query, key, is_causal, attn_mask) * (query[3] + value[3])

    def backward(
        grad_out: tuple[int, ...],
        query: tuple[int, ...],
        key: tuple[int, ...],
        value: tuple[int, ...],
        out: tuple[int, ...],
        logsumexp: tuple[int, ...],
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *args: Any,
        attn_mask: object = None,
        **kwargs: Any,
    ) -> int:
        # scores recomputed (q k^T), grad scores (dout v^T), grad v (p^T dout), grad q (ds k), grad k (ds^T q)
        return 2 * query[0] * query[1] * pairs(query, key, is_causal, attn_mask) * (3 * query[3] + 2 * value[3])

    Shape = tuple[int, ...]

    def chunked_forward(query: Shape, key: Shape, value: Shape, *args: Any, **kwargs: Any) -> int:
        return forward(query, key, value, is_causal=True)

    def chunked_backward(grad_out: Shape, query: Shape, key: Shape, value: Shape, *args: Any, **kwargs: Any) -> int:
        return backward(grad_out, query, key, value, (), (), is_causal=True)

    import llavactl.model.causal_attention  # noqa: F401  (registers its ops)

    aten, ours = torch.ops.aten, torch.ops.llavactl
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
            ours.causal_attention: chunked_forward,
            ours.causal_attention_backward: chunked_backward,
        },
    )
