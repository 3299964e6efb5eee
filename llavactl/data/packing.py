"""Padding-free batches: records laid end to end in one row, how a batch says where they are, and
micro-batches that fill a token budget.

A packed row carries ``position_ids`` that restart at 0 with each record; that is the whole
contract. transformers reads record boundaries from them (a position that does not follow the one
before starts a record) to build its packed-sequence masks and flash-attention's varlen calls, and
llavactl's CPU attention reads them the same way, through :func:`record_lengths`, the one place
that rule is written. A padded batch has no ``position_ids`` and one record per row.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llavactl.data.templates import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def pack(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """``input_ids``/``labels``/``position_ids`` Long[1, T] of ``items`` laid end to end. A record's
    first token is never a target (nothing of the record comes before it): its label is -100, so
    that no record learns from the one before it in the row."""
    import torch

    labels = [it["labels"].clone() for it in items]
    for record_labels in labels:
        record_labels[0] = IGNORE_INDEX
    return {
        "input_ids": torch.cat([it["input_ids"] for it in items]).unsqueeze(0),
        "labels": torch.cat(labels).unsqueeze(0),
        "position_ids": torch.cat([torch.arange(len(it["input_ids"])) for it in items]).unsqueeze(0),
    }


def record_lengths(position_ids: torch.Tensor) -> list[int]:
    """The lengths of the records of one packed row, from its ``(1, T)`` position ids: a record
    starts wherever a position does not follow the one before (transformers' rule)."""
    import torch

    positions = position_ids.reshape(-1)
    starts = (torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1).tolist()
    bounds = [0, *starts, len(positions)]
    return [end - start for start, end in itertools.pairwise(bounds)]


def sequence_lengths(batch: Mapping[str, torch.Tensor]) -> list[int]:
    """The length of each sequence the model attends over in ``batch``: the packed records' lengths,
    or the padded row length once per row (pads are computed too)."""
    positions = batch.get("position_ids")
    if positions is None:
        rows, length = batch["input_ids"].shape
        return [length] * rows
    return record_lengths(positions)


def records_in(batch: Mapping[str, torch.Tensor]) -> int:
    """The records of a collated ``batch``, packed or padded."""
    positions = batch.get("position_ids")
    return len(record_lengths(positions)) if positions is not None else len(batch["input_ids"])


def tokens_in(batch: Mapping[str, torch.Tensor]) -> int:
    """The records' own tokens in a collated ``batch``, pads left out."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def first_fit_decreasing(
    indices: Sequence[int], lengths: Sequence[int] | Mapping[int, int], budget: int
) -> list[list[int]]:
    """``indices`` in bins of at most ``budget`` tokens: longest first, each into the first bin with
    room (ties broken by index, so the bins depend only on the input). A record longer than the
    budget gets a bin of its own."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        need = lengths[i]
        for k, left in enumerate(room):
            if need <= left:
                bins[k].append(i)
                room[k] -= need
                break
        else:
            bins.append([i])
            room.append(budget - need)
    return bins
