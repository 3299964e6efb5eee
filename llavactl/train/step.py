"""One optimizer step: the unit that training, the local_lite benchmark and the planner's trace run.

:class:`TrainingStep` takes the micro-batches of one optimizer step and does, in order: count the
supervised tokens of the step (over every process), forward each micro-batch under the run's
autocast, divide its summed token loss by those supervised tokens, backward (gradients reduced
across processes only on the last micro-batch), clip, step the optimizer unless the loss or the
gradient is not finite (a gradient scaler decides that itself for fp16), and step the scheduler.
Dividing by the step's supervised tokens, not by each micro-batch's, makes every supervised token
weigh the same however tokens fall into micro-batches and processes.

The planner traces :meth:`TrainingStep.accumulate` (forward and backward) on fake tensors, so its
memory and FLOP figures are those of this code.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llavactl.data.packing import records_in, tokens_in
from llavactl.errors import DataError
from llavactl.resolve.run import Precision, World
from llavactl.train import distributed
from llavactl.train.loss import supervised_token_count

if TYPE_CHECKING:
    import torch
    from torch import nn

Batch = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did. ``loss`` is the mean supervised-token loss over every process."""

    loss: float
    grad_norm: float
    good: bool  # False: non-finite loss or gradient, no update
    samples: int  # records of the step, over every process (0: all were skipped; no update)
    tokens: int  # real (unpadded) tokens of the step, over every process
    supervised: int  # supervised tokens of the step, over every process

    @property
    def updated(self) -> bool:
        return self.samples > 0 and self.good


class TrainingStep:
    """Forward, normalised loss, backward, accumulation, clipping, optimizer and scheduler: one step."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any = None,
        *,
        precision: Precision,
        device: torch.device,
        world: World | None = None,
        max_grad_norm: float = 1.0,
    ) -> None:
        """``model`` computes a micro-batch's summed token loss (a :class:`~llavactl.train.loss.TokenLoss`,
        possibly wrapped by DDP or FSDP); ``max_grad_norm`` 0 turns clipping off."""
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.precision = precision
        self.device = device
        self.world = world or World()
        self.max_grad_norm = max_grad_norm
        self.scaler = precision.grad_scaler_for(device.type)
        self._parameters = (
            [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []
        )
        self._last_batch: Batch | None = None

    def __call__(self, micro_batches: Sequence[Batch]) -> StepOutcome:
        """Run one optimizer step on this process's ``micro_batches`` (possibly none: see below)."""
        world, device = self.world, self.device
        local = [
            sum(supervised_token_count(b) for b in micro_batches),
            sum(records_in(b) for b in micro_batches),
            sum(tokens_in(b) for b in micro_batches),
        ]
        supervised, samples, tokens = (int(x) for x in distributed.sum_across(world, local, device))
        if not samples:
            # Every record of the step was skipped as bad (data.on_error: skip), on every process:
            # nothing to learn from, but the step keeps its place in the schedule.
            self._step_scheduler()
            return StepOutcome(math.nan, math.nan, False, 0, 0, 0)
        if micro_batches:
            self._last_batch = micro_batches[-1]
            batches, weight = list(micro_batches), 1.0
        else:
            # Only this process lost its records: it still takes part in the gradient reduction,
            # with a batch that counts for nothing.
            batches, weight = [self._placeholder_batch()], 0.0
        # The loss is summed over every process's supervised tokens of the step. DDP and FSDP
        # average the gradients over the processes, so each process's share is scaled back up by
        # the world size.
        step_loss = self.accumulate(batches, denominator=max(supervised, 1) / world.size, weight=weight)
        grad_norm = self._clip()
        # Each process's share was scaled up by the world size: the mean of the shares is the loss.
        loss = distributed.sum_across(world, [step_loss.item()], device)[0] / world.size
        good = math.isfinite(loss)
        if self.scaler is not None:
            # The scaler skips overflowing fp16 gradients itself and lowers its scale; that is
            # routine, not a bad step.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            good = good and math.isfinite(grad_norm)
            if good and self.optimizer is not None:
                self.optimizer.step()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self._step_scheduler()
        return StepOutcome(loss, grad_norm, good, samples, tokens, supervised)

    def accumulate(self, micro_batches: Sequence[Batch], *, denominator: float, weight: float = 1.0) -> torch.Tensor:
        """Forward and backward over ``micro_batches``, each loss divided by ``denominator`` (times
        ``weight``); gradients are synchronised across processes on the last one. Returns the
        step's loss (detached), summed over the micro-batches."""
        import torch

        step_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            on_device = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with distributed.gradient_sync(self.model, sync=i == last):
                with self.precision.autocast_context(self.device.type):
                    token_loss = self.model(on_device)
                scaled = token_loss / denominator if weight else token_loss * 0.0
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            step_loss += scaled.detach()
        return step_loss

    def _clip(self) -> float:
        """Clip to ``max_grad_norm`` (0: no clipping) and return the norm before clipping."""
        import torch

        if self.scaler is not None and self.optimizer is not None:
            self.scaler.unscale_(self.optimizer)
        return distributed.as_float(torch.nn.utils.clip_grad_norm_(self._parameters, self.max_grad_norm or math.inf))

    def _step_scheduler(self) -> None:
        if self.scheduler is not None:
            with warnings.catch_warnings():
                # A step with no update (every record skipped, a non-finite loss) keeps its place in
                # the schedule on purpose; torch warns when that happens before the first update.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                self.scheduler.step()

    def _placeholder_batch(self) -> Batch:
        """A batch for a process whose records of the step were all skipped while other processes
        have some: the last batch it used, to be weighted zero."""
        if self._last_batch is None:
            raise DataError(
                "every record this process was given for the first step was skipped as bad "
                "(data.on_error: skip), so it has no batch to take part in the gradient reduction with",
                fix="run `llavactl data check` on the data and fix or drop the bad records",
            )
        return self._last_batch

    def state_dict(self) -> dict[str, Any]:
        """The gradient scaler's state (what a checkpoint needs of the step besides the optimizer)."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
