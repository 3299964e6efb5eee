"""Steps whose loss or gradient is not finite: skipped (no update) and counted; too many in a row stop the run.

A run of bad steps usually means a learning rate too high for the precision, or bad data: after
``training.max_bad_steps`` in a row the run stops with one paragraph, keeping its last good
checkpoint (checkpoints are not saved during such a run, so that ``save_total_limit`` cannot push
the good one out). The counts are part of a checkpoint's progress record, so a resume goes on counting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llavactl.errors import TrainingError
from llavactl.train.checkpoint import latest_good_checkpoint


@dataclass
class BadSteps:
    limit: int  # training.max_bad_steps
    output_dir: Path  # where the last good checkpoint is looked for
    in_a_row: int = 0
    total: int = 0

    def count(self, good: bool, *, step: int, loss: float, say: Callable[[str], None]) -> None:
        """Count step ``step``; :class:`TrainingError` when it makes ``limit`` bad steps in a row."""
        if good:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        say(
            f"Step {step}: non-finite loss or gradient ({loss}); step skipped "
            f"({self.in_a_row} in a row, {self.total} in all)"
        )
        if self.in_a_row < self.limit:
            return
        last = latest_good_checkpoint(self.output_dir)
        kept = f"The last good checkpoint, {last}, is kept." if last else "No checkpoint had been saved yet."
        raise TrainingError(
            f"{self.in_a_row} steps in a row had a non-finite loss or gradient (up to step {step}), so "
            f"training stopped. {kept}",
            fix="lower `training.learning_rate`, keep `training.max_grad_norm` above 0, try "
            "`training.bf16=false training.fp16=false` (fp32), and run `llavactl data check` on the data",
        )
