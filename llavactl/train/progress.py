"""What the user sees while training: milestones, then per-step figures.

On a terminal the figures live in one Rich progress bar that updates in place; anywhere else
(a log file, CI, ``nohup``) every logging step is one plain line, so that logs stay greppable.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


@dataclass(frozen=True)
class StepStats:
    """The figures shown for one logging step."""

    step: int
    total_steps: int
    epoch: float  # fractional: 1.5 is halfway through the second epoch
    loss: float
    lr: float
    grad_norm: float
    samples_per_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    eta_s: float
    mfu: float | None = None  # achieved FLOP/s over the device's peak (None before it is known)

    def metrics(self) -> dict[str, float | int]:
        """The figures of a ``metrics.jsonl`` line (beside its step) that this line shows."""
        return {
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "epoch": self.epoch,
            "samples_per_s": self.samples_per_s,
            "tokens_per_s": self.tokens_per_s,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_stats(stats: StepStats, *, with_step: bool = True) -> str:
    """One line of figures: ``step 3/60 | epoch 0.05 | loss 2.3456 | lr 1.00e-04 | ...``."""
    parts = [f"step {stats.step}/{stats.total_steps}"] if with_step else []
    parts += [
        f"epoch {stats.epoch:.2f}",
        f"loss {stats.loss:.4f}",
        f"lr {stats.lr:.2e}",
        f"grad norm {stats.grad_norm:.3f}",
        f"{stats.samples_per_s:.2f} samples/s",
        f"{stats.tokens_per_s:.0f} tokens/s",
        *([f"MFU {stats.mfu:.1%}"] if stats.mfu is not None else []),
        f"peak mem {format_bytes(stats.peak_memory_bytes)}",
        f"ETA {format_duration(stats.eta_s)}",
    ]
    return " | ".join(parts)


class TrainingProgress:
    """Milestones and step figures on ``console``: live on a terminal, line by line otherwise."""

    def __init__(self, console: Console, *, quiet: bool = False) -> None:
        self._console = console
        self._quiet = quiet
        self._live: Progress | None = None
        self._task: int | None = None

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def milestone(self, text: str) -> None:
        """A line that stays: model loaded, data set processed, checkpoint saved."""
        if not self._quiet:
            self._console.print(escape(text), soft_wrap=True)

    def epoch(self, number: int, total: int) -> None:
        self.milestone(f"Epoch {number}/{total}")

    def start(self, total_steps: int, first_step: int) -> None:
        """Begin showing steps; ``first_step`` > 0 when resuming."""
        if self._quiet or not self._console.is_terminal:
            return
        self._live = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"),
            console=self._console,
            transient=False,
        )
        self._task = self._live.add_task("train", total=total_steps, completed=first_step, figures="")
        self._live.start()

    def step(self, stats: StepStats) -> None:
        if self._quiet:
            return
        if self._live is not None and self._task is not None:
            figures = format_stats(stats, with_step=False)
            self._live.update(self._task, completed=stats.step, figures=figures)
        else:
            self._console.print(format_stats(stats), soft_wrap=True, highlight=False)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
