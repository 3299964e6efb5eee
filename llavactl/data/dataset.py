"""What the trainer iterates: the dataset, its collator and a resumable, seeded sampler.

Records are read from the data's :class:`~llavactl.data.records.RecordSource` one at a time, as are
their images decoded and their text tokenized, so DataLoader workers share the work and no process
holds the parsed records. The batch layout is the one transformers'
``LlavaForConditionalGeneration`` consumes: every ``<image>`` is ``num_image_tokens`` copies of the
image token id, labels are -100 wherever nothing is learned.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from llavactl.config.schema import DataConfig, Profile
from llavactl.data.images import ImageFileError, ImageLimits, ImageSpec, load_image
from llavactl.data.packing import first_fit_decreasing, pack
from llavactl.data.records import Problem, Record, RecordProblem, RecordSource, parse_raw, require_records
from llavactl.data.source import DataSource
from llavactl.data.templates import IGNORE_INDEX, encoder_for, prepare
from llavactl.data.tokens import TokenContext
from llavactl.errors import DataError

# Megabatches of this many batches are sorted by length before being cut into batches
# (transformers' LengthGroupedSampler uses the same factor).
MEGABATCH_BATCHES = 50
# Records are binned for a token budget within megabatches of this many, drawn in the epoch's random
# order: enough to fill bins tightly, few enough that a bin's records come from all over the data.
BUDGET_MEGABATCH_RECORDS = 512
# Which way the samplers draw an epoch's order from the seed, kept in a checkpoint's sampler state:
# a checkpoint of another way is not resumed (its records would be seen twice, or never). 2: numpy.
ORDER_VERSION = 2


@dataclass(frozen=True)
class Skipped:
    """A record that could not be built into an item, and why."""

    index: int
    id: str | int | None
    code: str
    message: str


class LlavaDataset(Dataset):
    """Records as ``{"input_ids", "labels", "pixel_values", "index"}`` items, decoded on access.

    A record that cannot be built (not JSON, the wrong structure, an image, a cut) is returned as
    :class:`Skipped`; ``data.on_error`` decides what then happens (:func:`take_skipped`)."""

    def __init__(
        self,
        store: RecordSource,
        image_folder: Path,
        data: DataConfig,
        tokenizer: Any,
        image_token_id: int,
        spec: ImageSpec,
    ) -> None:
        self.store = store
        self.image_folder = image_folder
        self.data = data
        self.spec = spec
        self.limits = ImageLimits.of(data)
        self.encoder = encoder_for(tokenizer, image_token_id, spec.num_tokens, data.conversation_template)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any] | Skipped:
        try:
            raw = self.store.raw(i)
        except RecordProblem as e:  # not JSON: the message gives the line
            return Skipped(i, None, e.code, e.message)
        record = parse_raw(raw)
        if isinstance(record, Problem):
            where = self.store.where(i) or f"line {raw.line}"
            return Skipped(i, record.id, record.code, f"{where}: {record.message}")
        try:
            prepared = prepare(record, self.data.conversation_template, self.encoder, self.data.max_seq_len)
            pixels = [
                load_image(self.image_folder / p, self.spec, self.data.image_aspect_ratio, self.limits)
                for p in record.images
            ]
        except (RecordProblem, ImageFileError) as e:
            # Returned, not raised: an exception raised in a DataLoader worker reaches the main
            # process as a traceback string. :func:`take_skipped` raises it there instead.
            return Skipped(record.index, record.id, e.code, e.message)
        return {
            "input_ids": torch.tensor(prepared.encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(prepared.encoded.labels, dtype=torch.long),
            "pixel_values": torch.stack(pixels) if pixels else None,
            "index": record.index,
        }

    def token_lengths(self, *, unbuilt: int | None = None) -> np.ndarray:
        """Each record's exact length in tokens as the trainer builds it (image tokens included, cut
        at ``data.max_seq_len``), from its text alone: no image is opened. A record that cannot be
        built counts as ``unbuilt`` (default ``data.max_seq_len``: it is skipped or stopped on when its
        turn comes). The counts that `data check` kept are read back; else they are counted here, and kept."""
        from llavactl.data.lengths import token_counts

        max_len = self.data.max_seq_len
        counts = token_counts(self.store, self._token_context(), self.data.conversation_template, max_len)
        return np.where(counts.built(), np.minimum(counts.full, max_len), max_len if unbuilt is None else unbuilt)

    def _token_context(self) -> TokenContext:
        return TokenContext(self.encoder.tokenizer, self.encoder.image_token_id, self.spec)

    def records(self) -> Iterator[Record]:
        """The records that parse, in order (each file element decoded once more)."""
        return (r for r in self.store.parsed() if isinstance(r, Record))

    def modality_lengths(self) -> np.ndarray:
        """Lengths for grouping, positive for records with images, negative for text-only: the exact
        token counts where `data check` kept them for this tokenizer, template, image size and
        max_seq_len, else each record's size in bytes (no record is decoded for it; only the order
        within each modality matters)."""
        from llavactl.data.lengths import cached_counts

        counts = cached_counts(
            self.store, self._token_context(), self.data.conversation_template, self.data.max_seq_len
        )
        if counts is None:
            sizes = self.store.sizes()
            return np.where(self.store.has_image(), sizes, -sizes)
        # A record that does not build is skipped wherever it falls: 1 (or -1) keeps its modality.
        length = np.where(counts.built(), counts.full, 1)
        return np.where(counts.images > 0, length, -length)


class Collator:
    """Collates a list of items into the batch contract, right-padded or packed.

    Padded (the default): ``input_ids``/``attention_mask``/``labels`` Long[B, T], each record in
    its own row, right-padded to the longest. Packed (``padding_free``): the records laid end to end
    in one row, ``input_ids``/``labels``/``position_ids`` Long[1, T] with T the sum of their lengths,
    no pad token and no ``attention_mask``; the position ids restart at 0 with each record, which
    is how the model (transformers' packed-sequence masks, flash-attention's varlen path, llavactl's
    CPU attention) keeps every record's attention to itself. A record's first token is never a
    target (nothing of the record comes before it), so its label is -100 in the packed row as well.

    Either way, when any item has images, ``pixel_values`` Float[N, 3, S, S] in item order. Records
    that could not be built are left out and listed under ``skipped`` (a list of :class:`Skipped`):
    the trainer calls :func:`take_skipped` on every batch. A batch whose items all failed holds only
    ``skipped``.
    """

    def __init__(self, pad_token_id: int, *, padding_free: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free

    def __call__(self, items: Sequence[dict[str, Any] | Skipped]) -> dict[str, Any]:
        skipped = [it for it in items if isinstance(it, Skipped)]
        good = [it for it in items if not isinstance(it, Skipped)]
        batch: dict[str, Any] = {"skipped": skipped} if skipped else {}
        if not good:
            return batch
        batch.update(pack(good) if self.padding_free else self._padded(good))
        pixels = [it["pixel_values"] for it in good if it["pixel_values"] is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch

    def _padded(self, good: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in good)
        input_ids = torch.full((len(good), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(good), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(good), longest), dtype=torch.long)
        for row, it in enumerate(good):
            n = len(it["input_ids"])
            input_ids[row, :n] = it["input_ids"]
            labels[row, :n] = it["labels"]
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class _Position:
    """Where an epoch's order has got to: the epoch, and the records this process has used of it.
    The trainer calls :meth:`advance` with the records it used (a DataLoader prefetches, so a
    sampler cannot know), saves :meth:`state_dict` in its checkpoint, and after
    :meth:`load_state_dict` the next iteration continues at the saved position."""

    seed: int
    epoch = 0
    position = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def advance(self, num_samples: int) -> None:
        self.position += num_samples

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "order": ORDER_VERSION}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise DataError(
                f"the checkpoint's data order used seed {state['seed']}, this run uses {self.seed}",
                fix=f"resume with the same seed (`seed={state['seed']}`)",
            )
        if state.get("order", 1) != ORDER_VERSION:
            raise DataError(
                f"the checkpoint's data order was drawn by another llavactl version (order {state.get('order', 1)}, "
                f"this one draws order {ORDER_VERSION}): resumed here, the run would see some records twice and "
                "others never",
                fix="resume with the llavactl version that wrote the checkpoint, or start the run anew",
            )
        self.epoch, self.position = state["epoch"], state["position"]
        if state.get("world_size", self.world_size) != self.world_size:
            # Saved by another number of processes: ``global_batches`` micro-batches of the epoch's
            # order were used by all of them, the first ones; this process continues at its share of
            # the rest. (Every step is as many micro-batches on both numbers, so it divides evenly.)
            self._seek(state["epoch"], state["global_batches"] // self.world_size)

    def _seek(self, epoch: int, own_batches: int) -> None:
        """Continue ``epoch`` after this process's first ``own_batches`` batches of it (the next epoch
        when they are all it has)."""
        if own_batches >= self.batches_per_process_in(epoch):
            self.epoch, self.position = epoch + 1, 0
        else:
            self.epoch, self.position = epoch, self._records_in_batches(epoch, own_batches)

    world_size: int

    def batches_per_process_in(self, epoch: int) -> int:
        raise NotImplementedError

    def _records_in_batches(self, epoch: int, batches: int) -> int:
        raise NotImplementedError

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])


class ResumableSampler(_Position, Sampler[int]):
    """A seeded order of record indices per epoch that can be saved and resumed exactly.

    The order of epoch ``e`` depends only on ``(seed, e)``. The trainer calls :meth:`advance`
    with the number of samples it has consumed (a DataLoader prefetches, so the sampler cannot
    know), saves :meth:`state_dict` in its checkpoint, and after :meth:`load_state_dict` the next
    iteration continues at the saved position. With ``group_by_modality_length`` every batch of
    ``batch_size`` consecutive indices holds only image or only text-only records, of similar
    length (LLaVA's modality-grouped sampler), except the leftovers of the two groups, which
    come last.

    With ``world_size`` > 1 every process computes the same order and takes every
    ``world_size``-th batch of it, from batch ``rank`` on, so grouped batches stay whole and a
    step's micro-batches across processes are consecutive batches of the order. Every process
    gets as many batches: the last ``len(batches) % world_size`` batches of an epoch's order are
    left out (a different few each epoch). ``position`` counts this process's samples.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        seed: int,
        group_by_modality_length: bool = False,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group_by_modality_length
        self.rank = rank
        self.world_size = world_size
        if world_size > 1 and self.batches_per_process == 0:
            raise DataError(
                f"{len(self.lengths)} records make {self._batch_count} batches of {batch_size}, fewer than the "
                f"{world_size} training processes: some would have nothing to train on",
                fix="use more records, fewer processes, or a smaller `training.per_device_train_batch_size`",
            )

    @property
    def _batch_count(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    @property
    def batches_per_process(self) -> int:
        """Batches this process gets per epoch (every process gets as many)."""
        return self._batch_count // self.world_size

    @property
    def dropped_per_epoch(self) -> int:
        """Records of each epoch that no process gets, so that all get as many batches."""
        kept = min(self.batches_per_process * self.world_size * self.batch_size, len(self.lengths))
        return len(self.lengths) - kept

    def batches_per_process_in(self, epoch: int) -> int:
        return self.batches_per_process

    def _records_in_batches(self, epoch: int, batches: int) -> int:
        return batches * self.batch_size  # only an epoch's last batch is short, and it is not skipped

    def __len__(self) -> int:
        if self.world_size == 1:
            return len(self.lengths) - self.position
        last = self.batches_per_process * self.world_size - 1
        # Only the global last batch can be short, and only one process gets it.
        short = self._batch_count * self.batch_size - len(self.lengths) if last == self._batch_count - 1 else 0
        mine = self.batches_per_process * self.batch_size - (short if last % self.world_size == self.rank else 0)
        return max(mine - self.position, 0)

    def __iter__(self) -> Iterator[int]:
        # One index at a time from the array: a list of 665K Python ints would cost each process ~24 MB.
        for i in self._order(self.epoch)[self.position :]:
            yield int(i)

    def order(self, epoch: int) -> list[int]:
        """This process's indices for ``epoch``, in order."""
        return self._order(epoch).tolist()

    def _order(self, epoch: int) -> np.ndarray:
        whole = self._global_order(epoch)
        if self.world_size == 1:
            return whole
        # Batch k of the epoch goes to process k % world_size; the last few batches are left out.
        size, used = self.batch_size, self.batches_per_process * self.world_size
        at = (np.arange(self.rank, used, self.world_size)[:, None] * size + np.arange(size)).reshape(-1)
        return whole[at[at < len(whole)]]

    def _global_order(self, epoch: int) -> np.ndarray:
        rng = self._rng(epoch)
        if not self.group:
            return rng.permutation(len(self.lengths))
        batches, leftovers = [], []
        for group in (np.flatnonzero(self.lengths > 0), np.flatnonzero(self.lengths <= 0)):
            full, rest = self._length_grouped_batches(group, rng)
            batches.append(full)
            leftovers.append(rest)
        rows = np.concatenate(batches)
        return np.concatenate([rows[rng.permutation(len(rows))].reshape(-1), *leftovers])

    def _length_grouped_batches(self, indices: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``indices`` shuffled, sorted longest first within each megabatch, cut into rows of
        ``batch_size`` (Int[B, batch_size]) and the leftovers of the last, short batch."""
        indices = indices[rng.permutation(len(indices))]
        size = np.abs(self.lengths[indices])
        chunk = np.arange(len(indices)) // (self.batch_size * MEGABATCH_BATCHES)
        longest = int(size.max(initial=0))
        # By megabatch, then longest first; the stable sort keeps the shuffled order of ties.
        ordered = indices[np.argsort(chunk * (longest + 1) + (longest - size), kind="stable")]
        cut = len(ordered) - len(ordered) % self.batch_size
        return ordered[:cut].reshape(-1, self.batch_size), ordered[cut:]


class TokenBudgetBatches(_Position, Sampler[list[int]]):
    """Micro-batches of record indices filling ``budget`` tokens each, seeded, resumable, shared out.

    Epoch ``e``'s batches depend only on ``(seed, e)``: the records in a random order, cut into
    megabatches of :data:`BUDGET_MEGABATCH_RECORDS`, each binned by :func:`first_fit_decreasing`,
    the bins then shuffled. Binning another order can take a bin or two more or fewer, but the
    trainer counts steps per epoch once: every epoch of the run (``epochs``, see :meth:`plan_epochs`)
    gets as many batches as the one that needs the most, an epoch that needs fewer splitting its
    fullest batches in two. (An epoch past the planned ones that would need more leaves its last
    batches out; :attr:`dropped_per_epoch` counts them.) With ``world_size`` > 1 every process takes
    every ``world_size``-th batch from batch ``rank`` on, and every process gets as many (the last
    few batches of an epoch's order are left out). Resumed as :class:`ResumableSampler` is:
    ``position`` counts this process's records of the epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        budget: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        epochs: int = 1,
    ) -> None:
        """``lengths``: each record's exact length in tokens (image tokens included)."""
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self.budget = budget
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._binned_cache: tuple[int, list[list[int]]] | None = None
        self.per_epoch = 0
        self.plan_epochs(epochs)
        if world_size > 1 and self.batches_per_process == 0:
            raise DataError(
                f"{len(self.lengths)} records fill {self.per_epoch} micro-batches of "
                f"data.max_tokens_per_batch={budget} tokens, fewer than the {world_size} training processes",
                fix="use more records, fewer processes, or a smaller `data.max_tokens_per_batch`",
            )

    def plan_epochs(self, epochs: int) -> None:
        """Make epochs ``0 .. epochs - 1`` all as long (in batches) as the longest of them."""
        self.per_epoch = max(len(self._binned(e)) for e in range(max(1, epochs)))

    def _binned(self, epoch: int) -> list[list[int]]:
        if self._binned_cache is None or self._binned_cache[0] != epoch:
            rng = self._rng(epoch)
            order = rng.permutation(len(self.lengths))
            bins: list[list[int]] = []
            for start in range(0, len(order), BUDGET_MEGABATCH_RECORDS):
                chunk = order[start : start + BUDGET_MEGABATCH_RECORDS].tolist()
                lengths = dict(zip(chunk, self.lengths[chunk].tolist(), strict=True))
                bins += first_fit_decreasing(chunk, lengths, self.budget)
            self._binned_cache = (epoch, [bins[k] for k in rng.permutation(len(bins)).tolist()])
        return self._binned_cache[1]

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, :attr:`per_epoch` of them, in order, before they are shared out."""
        bins = [list(b) for b in self._binned(epoch)]
        while len(bins) < self.per_epoch:
            fullest = max(range(len(bins)), key=lambda k: (len(bins[k]), -k))
            batch = bins[fullest]
            if len(batch) < 2:
                break
            bins[fullest : fullest + 1] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        return bins[: self.per_epoch]

    @property
    def batches_per_process(self) -> int:
        return len(self.batches(self.epoch)) // self.world_size

    def batches_per_process_in(self, epoch: int) -> int:
        return len(self.batches(epoch)) // self.world_size

    def _records_in_batches(self, epoch: int, batches: int) -> int:
        return sum(len(batch) for batch in self.order(epoch)[:batches])

    def order(self, epoch: int) -> list[list[int]]:
        """This process's batches of ``epoch``, in order."""
        whole = self.batches(epoch)
        used = len(whole) // self.world_size * self.world_size
        return whole[self.rank : used : self.world_size]

    @property
    def dropped_per_epoch(self) -> int:
        """Records of the current epoch that no process gets, so that all get as many batches."""
        whole = self.batches(self.epoch)
        used = len(whole) // self.world_size * self.world_size
        return len(self.lengths) - sum(len(b) for b in whole[:used])

    def _remaining(self) -> list[list[int]]:
        done, left = 0, []
        for batch in self.order(self.epoch):
            if done >= self.position:
                left.append(batch)
            done += len(batch)
        return left

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._remaining()

    def __len__(self) -> int:
        return len(self._remaining())


@dataclass(frozen=True)
class Batching:
    """How a profile cuts records into micro-batches: what the padding estimates need of it."""

    batch_size: int
    seed: int
    group_by_modality_length: bool = False
    padding_free: bool = False
    max_tokens_per_batch: int | None = None

    @classmethod
    def of(cls, profile: Profile) -> Batching:
        data = profile.data
        return cls(
            profile.training.per_device_train_batch_size,
            profile.seed,
            data.group_by_modality_length,
            data.padding_free,
            data.max_tokens_per_batch,
        )


@dataclass(frozen=True)
class MicroBatchWork:
    """What the model computes per micro-batch on average over an epoch: records, tokens (pads
    included) and the query-key pairs of its attention."""

    records: float
    tokens: float
    pairs: float
    most_image_records: int = 0  # records with an image in the micro-batch that has the most


def _epoch_batches(lengths: Sequence[int], text_only: Sequence[bool], batching: Batching) -> list[list[int]]:
    """An epoch's micro-batches of the records of ``lengths``, as the trainer's sampler cuts them."""
    if batching.max_tokens_per_batch:
        return TokenBudgetBatches(lengths, batching.max_tokens_per_batch, batching.seed).batches(0)
    signed = [-n if text else n for n, text in zip(lengths, text_only, strict=True)]
    size = batching.batch_size
    order = ResumableSampler(signed, size, batching.seed, batching.group_by_modality_length).order(0)
    return [order[k : k + size] for k in range(0, len(order), size)]


def micro_batch_work(lengths: Sequence[int], text_only: Sequence[bool], batching: Batching) -> MicroBatchWork:
    """The average micro-batch of ``batching`` over records of ``lengths`` (tokens as the trainer
    cuts them): padded rows compute their pads, packed records only themselves."""
    from llavactl.model.flops import attention_pairs

    batches = _epoch_batches(lengths, text_only, batching)
    tokens = pairs = 0
    for b in batches:
        if batching.padding_free:  # each record its own causal attention
            tokens += sum(lengths[i] for i in b)
            pairs += sum(attention_pairs(lengths[i], lengths[i], is_causal=True) for i in b)
        else:  # rows padded to the longest; several rows run masked attention over every pair
            longest = max(lengths[i] for i in b)
            tokens += len(b) * longest
            pairs += len(b) * attention_pairs(longest, longest, is_causal=len(b) == 1)
    n = max(len(batches), 1)
    most_images = max((sum(1 for i in b if not text_only[i]) for b in batches), default=0)
    return MicroBatchWork(sum(len(b) for b in batches) / n, tokens / n, pairs / n, most_images)


def padding_summary(lengths: Sequence[int], text_only: Sequence[bool], batching: Batching) -> dict[str, Any]:
    """Tokens computed by an epoch of padded batches of ``batching.batch_size`` records (in the
    sampler's order for the profile's seed and grouping) against the records' own tokens; a
    padding-free micro-batch computes only the latter. ``lengths``: each record's tokens, as the
    trainer cuts them."""
    size = batching.batch_size
    padded_batching = Batching(size, batching.seed, batching.group_by_modality_length)
    batches = _epoch_batches(lengths, text_only, padded_batching)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    tokens = sum(lengths)
    return {
        "batch_size": size,
        "group_by_modality_length": batching.group_by_modality_length,
        "tokens": tokens,
        "padded_tokens": padded,
        "pad_fraction": 1 - tokens / padded if padded else 0.0,
        "padding_free": batching.padding_free,
    }


def take_skipped(batch: dict[str, Any], on_error: str) -> list[Skipped]:
    """Pop the batch's failed records; under ``data.on_error: raise`` stop on the first one."""
    skipped: list[Skipped] = batch.pop("skipped", [])
    if skipped and on_error == "raise":
        s = skipped[0]
        raise DataError(
            f"record {s.index} (id {s.id!r}): {s.code}: {s.message}",
            fix="fix or drop the record (`llavactl data check --write-clean FILE` writes the data without bad "
            "records), or skip bad records with `data.on_error=skip`",
        )
    return skipped


def build_dataset(
    source: DataSource, data: DataConfig, tokenizer: Any, image_token_id: int, spec: ImageSpec
) -> LlavaDataset:
    """The training dataset of the opened ``source`` of a profile's ``data`` section."""
    store = source.records
    require_records(store, str(source.path), empty_fix="point `data.data_path` at a non-empty data set")
    return LlavaDataset(store, source.image_folder, data, tokenizer, image_token_id, spec)
