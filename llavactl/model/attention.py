"""The LLM's attention: transformers' SDPA, with grouped-query keys and values repeated for CPU training.

With grouped-query attention (SmolLM: 9 query heads share 3 key/value heads) transformers asks
torch's kernel to handle the groups (`enable_gqa`). On a CPU that kernel's backward is slower than
the same attention given the key/value heads repeated: in local_lite's shapes (704 tokens, head
dimension 64, 2 cores) 26.4 against 23.5 ms per layer for forward and backward, 30 layers a step.
Repeating costs a copy of the keys and values per layer (and keeps it for the backward: 2 MiB a
layer at 704 tokens). Elsewhere (CUDA, inference, no groups) this is transformers' SDPA as is.

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
    """transformers' `sdpa_attention_forward`, given repeated key/value heads when training on a CPU."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and query.device.type == "cpu" and torch.is_grad_enabled():
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
