"""The training loss: summed next-token cross-entropy over the supervised tokens of a batch.

The loop divides the sum by the supervised tokens of the whole optimizer step, so that every
supervised token weighs the same however the tokens fall into micro-batches (a mean of per-batch
means would over-weight short replies). The LM head runs only at supervised positions: with 576
image tokens and a prompt per record, most positions are masked, and their logits would cost a
vocabulary-sized matmul and activation each for nothing. The head and the cross-entropy run as one
function where they can (:mod:`llavactl.train.linear_cross_entropy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


def llava_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``LlavaForConditionalGeneration`` inside ``model`` (itself, or under a peft wrapper)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def supervised_token_count(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens whose next-token prediction is supervised in ``batch``."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def summed_token_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over the supervised next-token predictions of ``batch`` (fp32)."""
    from llavactl.train.linear_cross_entropy import summed_cross_entropy

    llava = llava_of(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    hidden = llava.model(**inputs, use_cache=False)[0]
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    return summed_cross_entropy(llava.lm_head, hidden[:, :-1][supervised], targets[supervised])
