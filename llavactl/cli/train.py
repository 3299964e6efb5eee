"""`llavactl train --profile P [key=value ...] [--resume auto|PATH] [--force] [--output-dir DIR]`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from llavactl.cli._common import OverridesArg, ProfileOpt, console, err_console, load, verbosity
from llavactl.errors import CheckFailed

if TYPE_CHECKING:
    from llavactl.config.schema import Profile

ResumeOpt = Annotated[
    str | None,
    typer.Option(
        "--resume",
        help="Continue from a checkpoint: `auto` (the latest in training.output_dir, if any) or a checkpoint folder.",
        show_default=False,
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Resume even though the profile or data changed since the checkpoint."),
]
SkipDoctorOpt = Annotated[
    bool,
    typer.Option("--skip-doctor", help="Start without running doctor's blocking checks first."),
]
OutputDirOpt = Annotated[
    str | None,
    typer.Option(
        "--output-dir", help="Where checkpoints and logs go (same as training.output_dir=DIR).", show_default=False
    ),
]


def train(
    overrides: OverridesArg = None,
    *,
    profile: ProfileOpt,
    resume: ResumeOpt = None,
    force: ForceOpt = False,
    output_dir: OutputDirOpt = None,
    skip_doctor: SkipDoctorOpt = False,
) -> None:
    """Train a model with a profile: milestones, live progress, checkpoints, `run.json`."""
    from llavactl.train.progress import TrainingProgress
    from llavactl.train.recipe import TrainRecipe

    words = [*(overrides or []), *([f"training.output_dir={output_dir}"] if output_dir else [])]
    loaded = load(profile, words)
    if not skip_doctor:
        _preflight(loaded.profile)
    with TrainingProgress(console, quiet=verbosity.level == 0) as progress:
        recipe = TrainRecipe(loaded, progress, resume=resume, force=force)
        try:
            recipe.setup()
            result = recipe.train()
        finally:
            recipe.cleanup()
    if result.status == "interrupted":
        console.print(
            f"Stopped at step {result.step}/{result.total_steps}; checkpoint saved in {result.checkpoint}. "
            "Continue with the same command and `--resume auto`.",
            soft_wrap=True,
        )
        raise typer.Exit(result.exit_code)
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    console.print(
        f"Finished {result.step} steps; final loss {final}; checkpoint in {result.checkpoint}", soft_wrap=True
    )


def _preflight(profile: Profile) -> None:
    """Run doctor's checks; stop on a blocking failure with doctor's findings and fixes."""
    from llavactl.doctor import blocking_failures, run_checks

    results = run_checks(profile)
    failures = blocking_failures(results)
    if failures:
        lines = "\n".join(f"  - {r.check}: {r.finding}\n    Fix: {r.fix}" for r in failures)
        raise CheckFailed(
            f"llavactl doctor found {len(failures)} problem{'s' if len(failures) > 1 else ''} that stop this run:\n"
            + lines,
            fix="apply the fixes above (or run `llavactl doctor --profile ...` for every check); "
            "`--skip-doctor` starts anyway",
        )
    if verbosity.level > 0:
        for r in results:
            if r.status == "warn":
                err_console.print(
                    f"[yellow]warning[/] {escape(r.check)}: {escape(r.finding)} Fix: {escape(r.fix or '')}"
                )
