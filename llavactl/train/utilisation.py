"""Achieved FLOP/s of training steps and their share of the device's peak (MFU), beside the loss.

The FLOPs of the first optimizer step a process runs are counted exactly (:func:`op_flop_counter`:
forward, backward, recomputation, attention as the kernels compute it). Later steps are credited
by their shapes: the non-attention work scales with the tokens computed (padding included, as
the device computes it), the attention work with the sum of squared sequence lengths (rows, or
packed records). The peak is the datasheet's dense rate for known GPUs in the run's precision
(:data:`llavactl.resolve.gpus.GPUS`, the table dry-run plans fleets with),
else this device's steady matmul rate in the run's precision
(:func:`llavactl.model.flops.measure_matmul_flops`: the best this machine has shown), which on a
CPU is the practical peak.
Counting only watches the ops, so the counted step computes exactly what an uncounted one does
(exact resume holds whichever step a process counts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llavactl.resolve.gpus import gpu_of_device

if TYPE_CHECKING:
    import torch

    from llavactl.resolve.run import ResolvedRun

@dataclass(frozen=True)
class DevicePeak:
    flops_per_s: float
    source: str  # e.g. "H100 SXM 80GB datasheet, bf16 dense" or "measured float32 matmul (steady peak)"


def device_peak(resolved: ResolvedRun) -> DevicePeak:
    """The peak FLOP/s that MFU is reported against, for the run's device and precision."""
    from llavactl.model.flops import measure_matmul_flops

    precision = resolved.precision
    if resolved.device_type == "cuda" and resolved.facts.gpus:
        name = resolved.facts.gpus[min(resolved.world.local_rank, len(resolved.facts.gpus) - 1)].name
        gpu = gpu_of_device(name)  # the table dry-run plans fleets with
        if gpu is not None:
            rate, kind = gpu.peak(precision)
            return DevicePeak(rate, f"{gpu.name} datasheet, {kind} dense")
    # Measured in the run's precision: a bf16 run on a CPU with native bf16 against its bf16 rate.
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision.autocast or "", "float32")
    return DevicePeak(measure_matmul_flops(resolved.device, dtype), f"measured {dtype} matmul (steady peak)")


def _shape_work(batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(tokens computed, sum of squared sequence lengths) of a step's micro-batches."""
    from llavactl.data.packing import sequence_lengths

    tokens = squares = 0.0
    for batch in batches:
        lengths = sequence_lengths(batch)
        tokens += sum(lengths)
        squares += sum(n * n for n in lengths)
    return tokens, squares


class StepFlops:
    """FLOPs per optimizer step: counted on the first step, then scaled by each step's shapes."""

    def __init__(self) -> None:
        self._linear = self._attention = 0.0  # FLOPs of the counted step, by kind
        self._tokens = self._squares = 0.0  # its shapes
        self._counted = False

    @property
    def ready(self) -> bool:
        """Whether a step has been counted, so that :meth:`of` can credit steps."""
        return self._counted

    @contextlib.contextmanager
    def count(self, batches: Sequence[dict[str, torch.Tensor]]) -> Iterator[None]:
        """Around the first step: count its FLOPs; around later ones: nothing."""
        if self._counted or not batches:
            yield
            return
        from llavactl.model.flops import attention_share, op_flop_counter

        with op_flop_counter() as counter:
            yield
        attention = float(attention_share(counter.by_op))
        self._attention = attention
        self._linear = float(counter.total) - attention
        self._tokens, self._squares = _shape_work(batches)
        self._counted = True

    def of(self, batches: Sequence[dict[str, torch.Tensor]]) -> float | None:
        """This process's FLOPs for a step of ``batches`` (None before the first counted step)."""
        if not self._counted:
            return None
        from llavactl.model.flops import scaled_flops

        return scaled_flops(self._linear, self._attention, (self._tokens, self._squares), _shape_work(batches))
