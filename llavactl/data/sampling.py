"""Which sampler cuts an epoch into micro-batches for training, and the line that says what it made.

A token budget (``data.max_tokens_per_batch``) bins records by their token lengths
(:class:`~llavactl.data.dataset.TokenBudgetBatches`); otherwise batches have
``training.per_device_train_batch_size`` records (:class:`~llavactl.data.dataset.ResumableSampler`,
grouped by modality and length when ``data.group_by_modality_length``). Both give each process its
share and resume at the record where a checkpoint left off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from llavactl.config.schema import Profile
from llavactl.data.dataset import LlavaDataset, ResumableSampler, Skipped, TokenBudgetBatches, take_skipped
from llavactl.data.packing import records_in
from llavactl.errors import DataError

Sampler = ResumableSampler | TokenBudgetBatches


def choose_sampler(
    dataset: LlavaDataset,
    modality_lengths: np.ndarray,
    profile: Profile,
    *,
    rank: int,
    world_size: int,
    say: Callable[[str], None],
) -> tuple[Sampler, dict[str, Any]]:
    """The sampler of this process and the DataLoader arguments that use it; ``modality_lengths``:
    the dataset's (:meth:`~llavactl.data.dataset.LlavaDataset.modality_lengths`)."""
    data, training, seed = profile.data, profile.training, profile.seed
    if data.max_tokens_per_batch:
        say(f"Measuring {len(dataset):,} records in tokens for data.max_tokens_per_batch")
        budget = TokenBudgetBatches(
            dataset.token_lengths(), data.max_tokens_per_batch, seed, rank=rank, world_size=world_size
        )
        # Every epoch of the run as long as its longest (binning another order can take a bin more).
        budget.plan_epochs(training.epochs(training.steps_per_epoch(budget.batches_per_process)))
        return budget, {"batch_sampler": budget}
    sampler = ResumableSampler(
        modality_lengths,
        training.per_device_train_batch_size,
        seed,
        data.group_by_modality_length,
        rank=rank,
        world_size=world_size,
    )
    return sampler, {"batch_size": training.per_device_train_batch_size, "sampler": sampler}


def describe_batches(sampler: Sampler, profile: Profile, *, world_size: int) -> str:
    """What an epoch's micro-batches are and how they make the global batch, e.g. ``batches of 4
    per epoch; global batch 8 = 4 per device x 2 accumulation x 1 process``."""
    data, training = profile.data, profile.training
    accumulation = training.gradient_accumulation_steps
    per = f" on each of {world_size} processes" if world_size > 1 else ""
    dropped = sampler.dropped_per_epoch
    left_out = f" ({dropped} records of each epoch left out so that all get as many)" if dropped else ""
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    if isinstance(sampler, TokenBudgetBatches):
        micro = sampler.order(0)
        records = sum(len(b) for b in micro) / max(len(micro), 1)
        tokens = sum(sampler.lengths[i] for b in micro for i in b) / max(len(micro), 1)
        per_step = accumulation * world_size
        return (
            f"micro-batches of up to {data.max_tokens_per_batch:,} tokens per epoch{per} ({records:.1f} records "
            f"and {tokens:,.0f} tokens each on average){left_out}; global batch {records * per_step:.1f} "
            f"records, {tokens * per_step:,.0f} tokens = 1 micro-batch per device x "
            f"{accumulation} accumulation x {processes}"
        )
    batch = training.per_device_train_batch_size
    packed = ", each packed into one row (data.padding_free)" if data.padding_free else ""
    return (
        f"batches of {batch} per epoch{per}{packed}{left_out}; global batch "
        f"{profile.global_batch_size * world_size} = {batch} per device x "
        f"{accumulation} accumulation x {processes}"
    )


def optimizer_steps(
    loader: Iterable[dict[str, Any]],
    sampler: Sampler,
    *,
    accumulation: int,
    steps_per_epoch: int,
    first_step: int,
    on_error: str,
    on_epoch: Callable[[int], None],
    on_skipped: Callable[[list[Skipped]], None],
    first_epoch: int | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """The micro-batches of each optimizer step from ``first_step`` on, in epoch ``first_epoch``
    (default: the one ``first_step`` falls in; a run resumed on another number of processes is in the
    epoch the sampler continues); the last step of an epoch may have fewer. ``on_epoch`` hears of
    each epoch as it starts (counted from 0), ``on_skipped`` of the records ``data.on_error: skip``
    left out of a batch.

    A step is always ``accumulation`` batches of the loader, whether or not their records survive
    ``data.on_error: skip``, so that an epoch has the steps it was planned with; a step whose
    batches were all bad comes out empty. An epoch without one usable record stops the run.
    """
    step = first_step
    epoch = first_step // steps_per_epoch if first_epoch is None else first_epoch
    while True:
        on_epoch(epoch)
        sampler.set_epoch(epoch)
        pending: list[dict[str, Any]] = []
        seen = used = 0
        for batch in loader:
            skipped = take_skipped(batch, on_error)
            # The sampler cannot see what the DataLoader has prefetched, so it is told what was used.
            sampler.advance(len(skipped) + (records_in(batch) if "input_ids" in batch else 0))
            if skipped:
                on_skipped(skipped)
            seen += 1
            if "input_ids" in batch:
                pending.append(batch)
                used += 1
            if seen % accumulation == 0:
                step += 1
                yield pending
                pending = []
        if seen % accumulation:
            step += 1
            yield pending
        if not used:
            raise DataError(
                f"epoch {epoch + 1} produced no usable record: every record was skipped as bad",
                fix="run `llavactl data check` on the data and fix or drop the bad records",
            )
        epoch += 1


def worst_micro_batch(lengths: np.ndarray, profile: Profile) -> list[int]:
    """The records of the most demanding micro-batch an epoch can hold, from each record's exact
    length (0 for one that does not build): the ``per_device_train_batch_size`` longest, or, under
    ``data.max_tokens_per_batch``, the budget filled longest first (as the binning fills its first
    bin). Ties go to the lower index, so the choice depends only on the data."""
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    order = order[lengths[order] > 0]
    budget = profile.data.max_tokens_per_batch
    if not budget:
        return [int(i) for i in order[: profile.training.per_device_train_batch_size]]
    chosen: list[int] = []
    room = budget
    for i in order:
        if lengths[i] <= room or not chosen:  # a record longer than the budget is a bin of its own
            chosen.append(int(i))
            room -= int(lengths[i])
        if room <= 0:
            break
    return chosen
