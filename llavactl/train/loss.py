"""The training loss: summed next-token cross-entropy over the supervised tokens of a batch.

The loop divides the sum by the supervised tokens of the whole optimizer step, so that every
supervised token weighs the same however the tokens fall into micro-batches (a mean of per-batch
means would over-weight short replies). The LM head runs only at supervised positions: with 576
image tokens and a prompt per record, most positions are masked, and their logits would cost a
vocabulary-sized matmul and activation each for nothing. The head and the cross-entropy run as one
function where they can (:mod:`llavactl.train.linear_cross_entropy`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from torch import nn

from llavactl.data.templates import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

LossFn = Callable[[nn.Module, Mapping[str, "torch.Tensor"]], "torch.Tensor"]


def llava_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``LlavaForConditionalGeneration`` inside ``model`` (itself, or under a peft wrapper)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def supervised_token_count(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens whose next-token prediction is supervised in ``batch``."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _hidden_states(llava: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    # position_ids only in a packed batch (data.padding_free), where they separate the records.
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values") if k in batch}
    return llava.model(**inputs, use_cache=False)[0]


def summed_token_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed over the supervised next-token predictions of ``batch`` (fp32)."""
    from llavactl.train.linear_cross_entropy import summed_cross_entropy

    llava = llava_of(model)
    hidden = _hidden_states(llava, batch)
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    return summed_cross_entropy(llava.lm_head, hidden[:, :-1][supervised], targets[supervised])


def last_positions_loss(supervised: int) -> LossFn:
    """:func:`summed_token_loss` with the supervised positions fixed to the last ``supervised`` ones:
    the same shapes and work, without the boolean mask whose size fake tensors cannot know (the
    planner traces the step on fake tensors)."""

    def summed_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        from llavactl.train.linear_cross_entropy import summed_cross_entropy

        llava = llava_of(model)
        hidden = _hidden_states(llava, batch)
        rows = hidden[:, -supervised - 1 : -1].reshape(-1, hidden.shape[-1])
        targets = batch["labels"][:, -supervised:].reshape(-1)
        return summed_cross_entropy(llava.lm_head, rows, targets)

    return summed_loss


class TokenLoss(nn.Module):
    """The summed token loss as a module, so that a DDP or FSDP wrapper's hooks run around it
    (the loss calls the LLaVA model's parts, not its ``forward``)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None) -> None:
        """``loss_fn``: the loss of a micro-batch, by default :func:`summed_token_loss`."""
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self._loss_fn or summed_token_loss)(self.model, batch)
