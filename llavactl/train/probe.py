"""The memory probe: the epoch's most demanding micro-batch, forward and backward once before step 1.

Out of memory in hour nine is the longest micro-batch coming late in the epoch. The probe runs that
micro-batch first (:func:`llavactl.data.sampling.worst_micro_batch`: its longest records by exact
length, or its fullest token budget), forward and backward with the run's own step code and no
update, measures the peak, adds the AdamW states the first update allocates, and prints the sum
beside dry-run's estimate. When it does not fit, the run stops there with the overrides that use
less. The gradients are dropped and every random state is put back, so the run that follows trains
exactly as one without the probe.

The peak: on CUDA, the allocator's peak of allocated memory over the probe; on a CPU, the
process's resident high-water mark, reset before the probe where Linux allows it
(``/proc/self/clear_refs``), else the process's peak so far (an upper bound).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llavactl.config.schema import Profile
from llavactl.data.dataset import take_skipped
from llavactl.data.packing import records_in
from llavactl.data.sampling import worst_micro_batch
from llavactl.errors import DataError, TrainingError
from llavactl.train.checkpoint import capture_rng, restore_rng
from llavactl.train.loss import supervised_token_count
from llavactl.train.metrics import peak_memory_bytes
from llavactl.train.out_of_memory import out_of_memory_error
from llavactl.train.progress import format_bytes

if TYPE_CHECKING:
    import torch

    from llavactl.data.dataset import LlavaDataset
    from llavactl.train.step import TrainingStep

GIB = 1024**3
# The estimate dry-run made for this run, and the overrides whose estimate fits (None: it fits, or none does).
Estimate = tuple[int, str | None]


@dataclass(frozen=True)
class ProbeResult:
    """What the probe measured, and what it is compared with."""

    records: int
    tokens: int  # the micro-batch's tokens as computed (a padded batch counts its pad tokens)
    measured_bytes: int  # peak over forward and backward
    optimizer_bytes: int  # AdamW states the first update will allocate
    capacity_bytes: int | None  # what this process can have on the device (None: unknown)
    estimate: Estimate | None  # dry-run's, when the command made one
    seconds: float
    exact: bool  # the peak is the probe's own (False: the process's peak so far, an upper bound)

    @property
    def projected_bytes(self) -> int:
        return self.measured_bytes + self.optimizer_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_bytes is None else self.projected_bytes <= self.capacity_bytes

    def said(self) -> str:
        peak = "peak" if self.exact else "process peak so far"
        states = f" + {format_bytes(self.optimizer_bytes)} of AdamW states at the first update" * bool(
            self.optimizer_bytes
        )
        beside = [f"dry-run estimated {format_bytes(self.estimate[0])}"] if self.estimate else []
        beside += [f"{format_bytes(self.capacity_bytes)} to be had"] if self.capacity_bytes is not None else []
        return (
            f"Memory probe: the epoch's most demanding micro-batch ({self.records} records, {self.tokens:,} tokens) "
            f"ran forward and backward in {self.seconds:.1f} s: {peak} {format_bytes(self.measured_bytes)}{states} "
            f"= {format_bytes(self.projected_bytes)}" + (f" ({'; '.join(beside)})" if beside else "")
        )


def probe_enabled(profile: Profile, device_type: str) -> bool:
    """``training.memory_probe``, or (unset) on CUDA only."""
    probe = profile.training.memory_probe
    return device_type == "cuda" if probe is None else probe


def run_probe(
    dataset: LlavaDataset,
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    step: TrainingStep,
    profile: Profile,
    *,
    estimate: Callable[[], Estimate] | None,
) -> ProbeResult:
    """Run the epoch's most demanding micro-batch through ``step`` without an update; gradients
    dropped and random states restored afterwards. ``estimate`` makes (or returns) dry-run's
    estimate: called in here, so that what it draws at random is put back too."""
    device = step.device
    optimizer_bytes = _optimizer_state_bytes(step.optimizer)
    states = capture_rng()
    try:
        planned = estimate() if estimate is not None else None
        batch = _worst_batch(dataset, collate, profile)
        with _peak(device) as (read_peak, exact):
            started = time.perf_counter()
            step.accumulate([batch], denominator=max(supervised_token_count(batch), 1))
            seconds = time.perf_counter() - started
            measured = read_peak()
    finally:
        if step.optimizer is not None:
            step.optimizer.zero_grad(set_to_none=True)
        restore_rng(states)
    return ProbeResult(
        records=records_in(batch),
        tokens=batch["input_ids"].numel(),
        measured_bytes=measured,
        optimizer_bytes=optimizer_bytes,
        capacity_bytes=_capacity(device),
        estimate=planned,
        seconds=seconds,
        exact=exact,
    )


def _worst_batch(
    dataset: LlavaDataset, collate: Callable[[list[Any]], dict[str, torch.Tensor]], profile: Profile
) -> dict[str, torch.Tensor]:
    """The worst micro-batch of records that build: under ``data.on_error: raise`` a record that does
    not stops the run here, as it would when its turn came; under ``skip`` the next-longest takes its
    place (as many rounds as it takes)."""
    lengths = dataset.token_lengths(unbuilt=0).copy()
    while True:
        batch = collate([dataset[i] for i in worst_micro_batch(lengths, profile)])
        skipped = take_skipped(batch, profile.data.on_error)
        if not skipped:
            return batch
        lengths[[s.index for s in skipped]] = 0
        if not lengths.any():
            raise DataError(
                "the memory probe found no record of the data set that builds",
                fix="run `llavactl data check` on the data and fix the records it names",
            )


def probe_failure(result: ProbeResult, profile: Profile, output_dir: Path, *, elsewhere: bool = False) -> TrainingError:
    """The run stops before step 1: the probe's figures (``elsewhere``: it did not fit on another
    process; this one's figures), and the overrides that use less memory (dry-run's fitting ones
    first, when it found some)."""
    batch = f"the memory probe's micro-batch ({result.records} records, {result.tokens:,} tokens)"
    projected, measured = format_bytes(result.projected_bytes), format_bytes(result.measured_bytes)
    capacity = format_bytes(result.capacity_bytes or 0)
    needs = f"{projected} ({measured} measured, then the AdamW states) of the {capacity} to be had"
    what = (
        f"{batch} did not fit on another process (this one's needs {needs})"
        if elsewhere
        else f"{batch} would need {needs}"
    )
    error = out_of_memory_error(profile, what, step=None, output_dir=output_dir)
    fits_with = result.estimate[1] if result.estimate else None
    if fits_with:
        return TrainingError(error.message, fix=f"add `{fits_with}` (dry-run's estimate fits with it); or {error.fix}")
    return error


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """AdamW's two moments per parameter (in its dtype, local shard only) not allocated yet."""
    if optimizer is None:
        return 0
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state.get(p):
                local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP shard
                total += 2 * local.numel() * local.element_size()
    return total


@contextmanager
def _peak(device: torch.device) -> Iterator[tuple[Callable[[], int], bool]]:
    """A reader of the peak memory from here on, and whether it is the window's own."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

        def cuda_peak() -> int:
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device))

        yield cuda_peak, True
        torch.cuda.reset_peak_memory_stats(device)  # the run's logged peak is its own
        return
    resettable = _reset_high_water_mark()
    yield (_high_water_mark if resettable else _process_peak), resettable


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from the current RSS
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _high_water_mark() -> int:
    return _status_bytes("VmHWM") or _process_peak()


def _process_peak() -> int:
    return peak_memory_bytes("cpu")


def _status_bytes(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _capacity(device: torch.device) -> int | None:
    """What this process can have: on CUDA its reserved pool and the device's free memory; on a
    CPU its resident memory and the RAM available (Linux)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))
    available, resident = _status_bytes("MemAvailable", "/proc/meminfo"), _status_bytes("VmRSS")
    return None if available is None or resident is None else available + resident
