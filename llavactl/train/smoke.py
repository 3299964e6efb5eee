"""A few real training steps with a save/reload round trip: `llavactl dry-run --steps N`.

Run A trains N + 1 steps and saves after step N and at the end. Run B is a fresh process state
(new model, new optimizer) resumed from A's checkpoint N; it trains step N + 1. Saving and
loading are right when B's loss for that step and B's saved weights equal A's, bit for bit. The
same recipe as `llavactl train` runs both, so what passes here is what the GPU run will do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llavactl.config.loader import LoadedProfile, load_profile
from llavactl.errors import CheckFailed
from llavactl.train.progress import TrainingProgress

if TYPE_CHECKING:
    from llavactl.resolve.run import ResolvedRun


@dataclass(frozen=True)
class SmokeResult:
    steps: int
    losses: list[float]  # run A, one per step (N + 1 of them)
    resumed_loss: float  # run B's loss for step N + 1
    losses_match: bool
    weights_match: bool
    differing_tensors: list[str]
    peak_bytes: int
    random_weights: bool

    def failure(self) -> CheckFailed | None:
        """The error when the reloaded run differs from the uninterrupted one (a bug in checkpoints)."""
        if self.losses_match and self.weights_match:
            return None
        return CheckFailed(
            f"After reloading checkpoint-{self.steps}, step {self.steps + 1} differs from the uninterrupted run "
            f"(loss {self.resumed_loss} vs {self.losses[-1]}; tensors differing: {self.differing_tensors}).",
            fix="this is a bug in saving or loading checkpoints: report it with this output",
        )


def _weights_at_hand(resolved: ResolvedRun) -> bool:
    """Whether the tower's and the LLM's weights are local (builtin, a folder, or the HF cache)."""
    weights = ("model.vision_tower", "model.model_name_or_path")
    return all(s.kind != "missing" for s in resolved.sources if s.key in weights)


def _run(loaded: LoadedProfile, progress: TrainingProgress, *, resume: str | None, random_weights: bool) -> list[float]:
    from llavactl.train.recipe import TrainRecipe

    return TrainRecipe(loaded, progress, resume=resume, random_weights=random_weights).run().losses


def _tensors(folder: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    tensors: dict[str, object] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    return tensors


def smoke_run(resolved: ResolvedRun, steps: int, workdir: Path, progress: TrainingProgress) -> SmokeResult:
    """Train ``steps`` + 1 steps, then resume from step ``steps`` and compare step ``steps`` + 1; with
    random weights in the real shapes when the weights are not here."""
    import torch

    from llavactl.train.metrics import peak_memory_bytes

    loaded = resolved.loaded
    random_weights = not _weights_at_hand(resolved)

    common = [
        *loaded.overrides,
        f"training.max_steps={steps + 1}",
        f"training.save_steps={steps}",
        "training.save_total_limit=null",
        "training.report_to=none",
    ]
    first = load_profile(str(loaded.source), [*common, f"training.output_dir={workdir / 'run'}"])
    losses = _run(first, progress, resume=None, random_weights=random_weights)
    peak = peak_memory_bytes(resolved.device_type)
    second = load_profile(str(loaded.source), [*common, f"training.output_dir={workdir / 'resumed'}"])
    progress.milestone(f"Reloading checkpoint-{steps} into a fresh model")
    resumed = _run(second, progress, resume=str(workdir / "run" / f"checkpoint-{steps}"), random_weights=random_weights)
    final = f"checkpoint-{steps + 1}"
    a, b = _tensors(workdir / "run" / final), _tensors(workdir / "resumed" / final)
    differing = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
    return SmokeResult(
        steps=steps,
        losses=losses,
        resumed_loss=resumed[-1],
        losses_match=resumed[-1] == losses[-1],
        weights_match=not differing,
        differing_tensors=differing[:10],
        peak_bytes=peak,
        random_weights=random_weights,
    )
