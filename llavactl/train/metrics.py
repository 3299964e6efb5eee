"""Training figures: the windows of steps they average, and where they go (``metrics.jsonl`` always,
tensorboard and wandb when asked, and ``run.json``).

``run.json`` describes a run for someone reading the output folder later: the resolved profile,
library versions, seed, device, how it ended and its final figures.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llavactl.errors import ConfigError, OutputError
from llavactl.system import is_full_disk

if TYPE_CHECKING:
    import torch

    from llavactl.train.utilisation import DevicePeak

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


@dataclass
class MetricWindow:
    """Figures accumulated over steps: those between two logged steps, or a whole run's.

    The window since the last logged step is kept in checkpoints, so that the first line logged
    after a resume averages the same steps as it would have without the interruption.
    """

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    flops: float | None = None  # this process's FLOPs of the steps whose FLOPs are known
    flop_seconds: float = 0.0  # the seconds of those steps

    def add(
        self,
        *,
        loss: float | None,
        grad_norm: float | None,
        samples: int,
        tokens: int,
        seconds: float,
        flops: float | None = None,
    ) -> None:
        if loss is not None:
            self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        self.samples += samples
        self.tokens += tokens
        if flops is not None:
            # Seconds count only alongside FLOPs: the counted step, slowed by counting, is left out.
            self.flops = (self.flops or 0.0) + flops
            self.flop_seconds += seconds
        self.seconds += seconds

    @classmethod
    def restored(cls, saved: Any) -> MetricWindow:
        """The window a checkpoint kept; an empty one for a checkpoint without it (or not of this shape)."""
        numbers = (int, float)
        try:
            window = cls(**saved)
            lists_ok = all(isinstance(x, numbers) for x in [*window.losses, *window.grad_norms])
            counts_ok = all(isinstance(x, numbers) for x in (window.samples, window.tokens, window.seconds))
        except TypeError:
            return cls()
        return window if lists_ok and counts_ok else cls()

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan

    @property
    def mean_grad_norm(self) -> float:
        return sum(self.grad_norms) / len(self.grad_norms) if self.grad_norms else math.nan

    def flops_per_s(self, world_size: int) -> float | None:
        """FLOP/s of the window's steps over every process (each process computes its own share)."""
        if self.flops is None or not self.flop_seconds:
            return None
        return self.flops * world_size / self.flop_seconds


@dataclass
class RunTotals:
    """What ``run.json``'s final figures sum up over the steps this process trained (since the
    resume, for a resumed run): the whole run's window and the records skipped, by code."""

    window: MetricWindow = field(default_factory=MetricWindow)
    skipped_by_code: Counter[str] = field(default_factory=Counter)

    @property
    def skipped_records(self) -> int:
        return sum(self.skipped_by_code.values())

    def final_metrics(
        self,
        losses: Sequence[float],
        *,
        step: int,
        bad_steps: int,
        seconds: float,
        world_size: int,
        peak: DevicePeak,
        checkpoint: Path | None,
    ) -> dict[str, Any]:
        """``run.json``'s ``final_metrics`` of a run that trained ``losses`` (its steps' losses)."""
        finite = [x for x in losses if math.isfinite(x)]
        flops_per_s = self.window.flops_per_s(world_size)
        return {
            "step": step,
            "first_loss": finite[0] if finite else None,
            "final_loss": finite[-1] if finite else None,
            "bad_steps": bad_steps,
            "skipped_records": self.skipped_records,
            "skipped_by_code": dict(sorted(self.skipped_by_code.items())),
            "train_seconds": round(seconds, 3),
            "flops_per_s": flops_per_s,
            "mfu": None if flops_per_s is None else flops_per_s / peak.flops_per_s,
            "mfu_peak_flops_per_s": peak.flops_per_s,
            "mfu_peak_source": peak.source,
            "checkpoint": str(checkpoint) if checkpoint else None,
        }


class MetricsWriter:
    """Appends one JSON object per logging step to ``metrics.jsonl`` and forwards to reporters."""

    def __init__(
        self, output_dir: Path, report_to: Sequence[str], *, config: Mapping[str, Any], from_step: int = 0
    ) -> None:
        """``from_step``: the step a resumed run continues after; lines of later steps (logged by
        the run before it stopped, after its last checkpoint) are dropped, so each step is there once."""
        output_dir.mkdir(parents=True, exist_ok=True)
        self._tensorboard = _open_tensorboard(output_dir) if "tensorboard" in report_to else None
        # wandb reads WANDB_MODE (offline, disabled) and WANDB_PROJECT itself.
        self._wandb = _open_wandb(output_dir, config) if "wandb" in report_to else None
        path = output_dir / METRICS_FILE
        try:
            if path.is_file():
                _keep_steps_up_to(path, from_step)
            self._file = path.open("a")
        except OSError as exc:  # a folder of that name, a read-only file
            raise _unwritable(str(path), exc) from None

    def log(self, step: int, values: Mapping[str, float | int]) -> None:
        record = {"step": step, **values}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            raise _unwritable(self._file.name, exc) from None
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the lines of ``path`` for steps after ``step`` (and torn or unreadable lines), atomically."""
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill mid-write
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _open_tensorboard(output_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            "training.report_to asks for tensorboard, but the tensorboard package is not installed.",
            fix="`pip install 'llavactl[tensorboard]'`, or add `training.report_to=none`",
        ) from exc
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


def _open_wandb(output_dir: Path, config: Mapping[str, Any]) -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError(
            "training.report_to asks for wandb, but the wandb package is not installed.",
            fix="`pip install 'llavactl[wandb]'`, or add `training.report_to=none`",
        ) from exc
    return wandb.init(dir=str(output_dir), config=dict(config), name=output_dir.name)


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that decide what training computes."""
    versions = {"python": platform.python_version()}
    for name in ("llavactl", "torch", "transformers", "peft", "safetensors", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_run_record(output_dir: Path, record: Mapping[str, Any]) -> Path:
    """Write ``run.json`` (replacing it atomically: a reader never sees half a file)."""
    path = output_dir / RUN_FILE
    tmp = output_dir / f".{RUN_FILE}.tmp"
    stamped = {**record, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        tmp.write_text(json.dumps(stamped, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _unwritable(str(path), exc) from None
    return path


def _unwritable(path: str, exc: OSError) -> OutputError:
    full = is_full_disk(exc)
    return OutputError(
        f"{path} cannot be written: {exc.strerror or exc}. The checkpoints saved so far are intact.",
        fix=("free space on that disk" if full else f"make {path} a file you can write to (move away what is there)")
        + ", then continue with `--resume auto`",
    )


def peak_memory_bytes(device_type: str) -> int:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS otherwise."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def describe_device(device: torch.device) -> dict[str, Any]:
    """The device of a run, as ``run.json`` records it."""
    import torch

    described: dict[str, Any] = {"type": device.type, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        described["name"] = torch.cuda.get_device_name(device)
        described["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return described
