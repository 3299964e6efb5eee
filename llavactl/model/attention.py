"""The LLM's attention: transformers' SDPA, made faster for training on a CPU.

An unmasked causal attention (a lone record, or records of one length) runs in query chunks
(:mod:`llavactl.model.causal_attention`), which skips most of the pairs above the diagonal that
torch's kernel computes and lets each key/value head of grouped-query attention (SmolLM: 9 query
heads share 3) serve its group without a copy: 20.0 against 17.2 ms a layer, forward and backward,
in local_lite's shapes (704 tokens, head dimension 64, 2 cores; 30 layers a step).

Records packed in one row (``data.padding_free``) run in the same kernel record by record, told
their lengths by the row's position ids, so that no pair across records is computed.

A padded batch's masked attention goes to SDPA, given the key/value heads repeated: transformers
would ask the kernel to handle the groups (`enable_gqa`), and on a CPU that kernel's backward is
slower, 26.4 against 23.5 ms per layer in the same shapes. Repeating costs a copy of the keys and
values per layer (kept for the backward: 2 MiB a layer at 704 tokens). Elsewhere (CUDA, inference)
this is transformers' SDPA as is.

Registered with transformers under :data:`NAME`, so that the model's config names it; the name is
not saved with a checkpoint (transformers leaves the attention implementation out of config.json).
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

NAME = "llavactl_sdpa"


def sdpa_repeating_groups(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa_attention_forward` when training on a CPU: the chunked causal kernel where
    it applies, else SDPA given repeated key/value heads."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if query.device.type != "cpu" or not torch.is_grad_enabled():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    lengths = _packed_lengths(kwargs.get("position_ids"), query.shape[0])
    # A packed row's mask is the records' causal blocks, which transformers built from the same
    # position ids: the record lengths say it all.
    mask = None if lengths else attention_mask
    if _plain_causal(module, query, key, value, mask, kwargs):
        from llavactl.model.causal_attention import causal_attention

        if torch.is_autocast_enabled("cpu"):  # what autocast would have SDPA run in
            dtype = torch.get_autocast_dtype("cpu")
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        scale = kwargs.get("scaling")
        out, _ = causal_attention(query, key, value, query.shape[-1] ** -0.5 if scale is None else scale, lengths)
        return out.transpose(1, 2).contiguous(), None  # (batch, tokens, heads, head_dim), already laid out so
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        # What sdpa_attention_forward reads of the module, with no groups left.
        module = types.SimpleNamespace(num_key_value_groups=1, is_causal=getattr(module, "is_causal", True))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_for(config: PretrainedConfig) -> None:
    """Make the model of ``config`` (an LLM's) use :func:`sdpa_repeating_groups` where it uses SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(NAME, sdpa_repeating_groups)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks SDPA takes
    config._attn_implementation = NAME


def _plain_causal(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> bool:
    """Whether SDPA would run this attention as the causal kernel alone, nothing else asked of it."""
    import torch

    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    extras = ("position_bias", "softcap", "output_attentions", "sliding_window", "s_aux")
    autocast = torch.is_autocast_enabled("cpu")
    return (
        is_causal
        and attention_mask is None
        and not kwargs.get("dropout")
        and not any(kwargs.get(name) for name in extras)
        and query.shape[1] % key.shape[1] == 0
        and key.shape[1] == value.shape[1]
        and query.shape[2] == key.shape[2] > 1
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        # fp64 stays out: autocast leaves it alone, and it is no training precision
        and {query.dtype, key.dtype, value.dtype} <= {torch.float32, torch.bfloat16, torch.float16}
        and (autocast or query.dtype == key.dtype == value.dtype)
    )


def _packed_lengths(position_ids: torch.Tensor | None, rows: int) -> list[int]:
    """The lengths of the records packed in a one-row batch (``data.padding_free``); empty unless
    there are several."""
    from torch._subclasses.fake_tensor import is_fake

    from llavactl.data.packing import record_lengths

    if position_ids is None or rows != 1 or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return []
    if is_fake(position_ids):  # the planner's trace: no values to read (it traces records as rows)
        return []
    lengths = record_lengths(position_ids)
    return lengths if len(lengths) > 1 else []


def check_records_stay_apart(language_model: nn.Module, autocast: Any = None) -> None:
    """Refuse ``data.padding_free`` for an LLM whose attention lets packed records see each other.

    Two short records of random embeddings go through ``language_model`` packed in one row, and
    the second alone; where attention keeps to each record (transformers' packed-sequence masks,
    flash-attention's varlen path, llavactl's CPU kernel) the second's outputs agree. Run as
    training runs it (gradients on, under ``autocast``: the run's autocast context), in eval mode so
    that dropout draws nothing; milliseconds.
    """
    import contextlib

    import torch

    from llavactl.errors import ConfigError

    embedding = language_model.get_input_embeddings()
    weight = embedding.weight
    first, second = 5, 4
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, first + second, embedding.embedding_dim, generator=generator).to(weight.device)
    embeds = embeds.to(weight.dtype if weight.is_floating_point() else torch.float32)
    positions = torch.cat([torch.arange(first), torch.arange(second)]).unsqueeze(0).to(weight.device)
    was_training = language_model.training
    language_model.eval()
    try:
        with torch.enable_grad(), autocast if autocast is not None else contextlib.nullcontext():
            packed = language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False)[0]
            alone = language_model(inputs_embeds=embeds[:, first:], position_ids=positions[:, first:], use_cache=False)[
                0
            ]
    finally:
        language_model.train(was_training)
    packed, alone = packed[:, first:].detach().float(), alone.detach().float()
    # Within rounding of the model's precision; a record that sees another is off by its own size.
    error = float((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-6))
    if not error < 1e-2:
        implementation = getattr(language_model.config, "_attn_implementation", "?")
        raise ConfigError(
            f"data.padding_free: the LLM ({type(language_model).__name__}, attention `{implementation}`) does not "
            "keep packed records apart: a record's outputs changed by "
            f"{error:.0%} when another record came before it in the row, so each record would attend to the "
            "records packed before it",
            fix="set `data.padding_free=false` (records padded, one per row), or use an LLM whose transformers "
            "model builds its masks from position ids (Llama, Mistral, Qwen2, Gemma and most others do)",
        )


def prepare_padding_free(
    language_model: nn.Module, device_type: str, *, half_precision: bool, autocast: Any = None
) -> str | None:
    """Set ``language_model`` up for padding-free rows: the varlen kernel where it runs
    (:func:`use_varlen_kernel`), then the check that packed records stay apart
    (:func:`check_records_stay_apart`). Returns what the kernel choice did, in words, or None."""
    said = use_varlen_kernel(language_model, device_type, half_precision=half_precision)
    check_records_stay_apart(language_model, autocast)
    return said


def use_varlen_kernel(language_model: nn.Module, device_type: str, *, half_precision: bool) -> str | None:
    """For padding-free rows on CUDA: switch ``language_model`` to flash-attention 2, whose varlen
    kernel computes only each record's own pairs (transformers reads the record boundaries from the
    position ids), when the ``flash_attn`` package is installed and the run computes in bf16 or fp16
    (the only dtypes the kernel takes). Otherwise the rows run transformers' SDPA under the
    packed-sequence mask, which keeps records apart but computes every pair of the row. Returns what
    happened, in words, or None when nothing was tried."""
    import importlib.util

    if device_type != "cuda" or importlib.util.find_spec("flash_attn") is None:
        return None
    if not half_precision:
        return "flash-attention 2 is installed but takes only bf16/fp16: the fp32 run keeps SDPA's packed mask"
    if getattr(language_model.config, "_attn_implementation", None) == "flash_attention_2":
        return None
    try:
        language_model.set_attn_implementation("flash_attention_2")
    except (ImportError, ValueError) as exc:  # a broken install, or a model without flash-attention 2
        return f"flash-attention 2 could not be used ({exc}); SDPA's packed mask keeps the records apart"
    return "the LLM runs flash-attention 2's varlen kernel"
