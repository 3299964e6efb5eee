"""`llavactl train` and `llavactl dry-run`: a run, and its plan (plus a few real steps) before it.

`dry-run --steps N` runs the same recipe as `train`, so the two cannot drift apart.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from llavactl.cli._common import (
    OverridesArg,
    ProfileOpt,
    console,
    err_console,
    load,
    phase,
    print_wrapped,
    shown,
    verbosity,
    wrapped,
)
from llavactl.cli._fleet import print_comparison, print_fleet_plan
from llavactl.cli._output import json_option, write_json
from llavactl.doctor import preflight
from llavactl.errors import ConfigError

if TYPE_CHECKING:
    from llavactl.plan import Plan
    from llavactl.plan.fleet import Fleet
    from llavactl.resolve import ResolvedRun
    from llavactl.train.recipe import TrainResult
    from llavactl.train.smoke import SmokeResult

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
StartOverOpt = Annotated[
    bool,
    typer.Option(
        "--start-over",
        help="Train from step 0 into an output folder that holds another run: its files are first moved "
        "aside into a sibling folder (nothing is deleted).",
    ),
]
ProbeOpt = Annotated[
    bool | None,
    typer.Option(
        "--probe/--no-probe",
        help="Before step 1, run the epoch's most demanding micro-batch once and stop if it does not fit "
        "(same as training.memory_probe=true/false; the default probes on CUDA only).",
        show_default=False,
    ),
]
NprocOpt = Annotated[
    int | None,
    typer.Option(
        "--nproc-per-node",
        min=1,
        help="Train on N processes of this machine (one per GPU): starts this command N times as torchrun "
        "would, and forwards Ctrl-C and SIGTERM to them (docs/distributed.md).",
        show_default=False,
    ),
]
StepsOpt = Annotated[
    int,
    typer.Option(
        "--steps",
        min=0,
        help="Then run N real steps (random weights in the real shapes when the weights are not here), "
        "save, reload into a fresh model, run one more step and check it matches.",
    ),
]
DeviceMemoryOpt = Annotated[
    float | None,
    typer.Option(
        "--device-memory",
        min=0.1,
        help="Free memory (GiB) of the device the run is for, e.g. 15 for a T4 when planning on a laptop.",
        show_default=False,
    ),
]
GpuOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu",
        help="Plan for GPUs that are not here, by name, spelled leniently (`a100-80gb`, `A100 80GB`, `h100`; an "
        "unknown name lists the known ones); comma-separated with --compare.",
        show_default=False,
    ),
]
GpusOpt = Annotated[
    str | None,
    typer.Option(
        "--gpus", help="GPUs per node (default 1; a list such as 1,2,4,8 with --compare).", show_default=False
    ),
]
NodesOpt = Annotated[
    str | None,
    typer.Option("--nodes", help="Nodes of --gpus GPUs each (default 1; a list with --compare).", show_default=False),
]
GpuSpecOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu-spec",
        help="A GPU the table lacks: `memory_gib=192,bf16_tflops=1307,tf32_tflops=653,link_gbps=448` (dense "
        "rates, link GB/s one way) or a YAML file of those keys (docs/dry-run.md).",
        show_default=False,
    ),
]
NetworkOpt = Annotated[
    float | None,
    typer.Option(
        "--network-gbps", min=1, help="Bandwidth between nodes, Gbit/s per node (default 400).", show_default=False
    ),
]
PriceOpt = Annotated[
    str | None,
    typer.Option(
        "--price-per-gpu-hour",
        help="USD per GPU-hour, for the cost: one figure, or per GPU (`a100-80gb=1.8,h100=3.2`).",
        show_default=False,
    ),
]
CompareOpt = Annotated[
    bool,
    typer.Option("--compare", help="Plan several fleets (--gpu and --gpus lists, else a default set), by cost."),
]
MaxHoursOpt = Annotated[
    float | None,
    typer.Option("--max-hours", min=0, help="With --compare: mark the cheapest fleet that finishes in time."),
]


def train(
    overrides: OverridesArg = None,
    *,
    profile: ProfileOpt,
    resume: ResumeOpt = None,
    force: ForceOpt = False,
    output_dir: OutputDirOpt = None,
    skip_doctor: SkipDoctorOpt = False,
    start_over: StartOverOpt = False,
    nproc_per_node: NprocOpt = None,
    probe: ProbeOpt = None,
) -> None:
    """Train a model with a profile: milestones, live progress, checkpoints, `run.json`."""
    from llavactl.train.progress import TrainingProgress
    from llavactl.train.recipe import TrainRecipe

    if resume is not None and start_over:
        raise ConfigError(
            f"--resume {resume} and --start-over ask for opposite things: to continue the run of the output "
            "folder, and to move it aside and train from step 0.",
            fix="keep one of them",
        )
    if nproc_per_node is not None and nproc_per_node > 1:
        raise typer.Exit(_launch(nproc_per_node))
    words = [*(overrides or []), *([f"training.output_dir={output_dir}"] if output_dir else [])]
    words += [f"training.memory_probe={str(probe).lower()}"] if probe is not None else []
    estimate = _PlanOnce()
    resolved = _resolved(profile, words, doctor=not skip_doctor, planner=estimate)
    with phase("training"), TrainingProgress(console, quiet=verbosity.level == 0) as progress:
        recipe = TrainRecipe(
            resolved.loaded,
            progress,
            resume=resume,
            force=force,
            resolved=resolved,
            start_over=start_over,
            memory_estimate=lambda: estimate(resolved),
        )
        result = recipe.run()
    if resolved.world.is_main:  # under torchrun, rank 0 speaks for the run
        _print_result(result)
    if result.status == "interrupted" or not resolved.world.is_main:
        raise typer.Exit(result.exit_code)


def _print_result(result: TrainResult) -> None:
    if result.status == "interrupted":
        console.print(
            f"Stopped at step {result.step}/{result.total_steps}; checkpoint saved in {result.checkpoint}. "
            "Continue with the same command and `--resume auto`.",
            soft_wrap=True,
        )
        return
    final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    console.print(
        f"Finished {result.step} steps; final loss {final}; checkpoint in {result.checkpoint}", soft_wrap=True
    )


def dry_run(
    overrides: OverridesArg = None,
    *,
    profile: ProfileOpt,
    steps: StepsOpt = 0,
    device_memory: DeviceMemoryOpt = None,
    gpu: GpuOpt = None,
    gpus: GpusOpt = None,
    nodes: NodesOpt = None,
    gpu_spec: GpuSpecOpt = None,
    network_gbps: NetworkOpt = None,
    price_per_gpu_hour: PriceOpt = None,
    compare: CompareOpt = False,
    max_hours: MaxHoursOpt = None,
    as_json: Annotated[bool, json_option("Print the plan as JSON (docs/dry-run.md).")] = False,
) -> None:
    """The plan without weights: parameters, tokens, steps, peak memory and time per step; with
    --gpu or --compare, memory per GPU, hours and cost on fleets that are not here."""
    from llavactl.plan import build_plan
    from llavactl.plan.memory import runtime_rss_bytes

    if compare or any(option is not None for option in (gpu, gpus, nodes, gpu_spec)):
        if steps or device_memory is not None:
            raise ConfigError(
                "--steps and --device-memory plan or run on this machine; --gpu, --gpus and --compare plan fleets "
                "that are not here.",
                fix="drop one of the two sets of options",
            )
        from llavactl.plan.fleet import fleets_of

        fleets = fleets_of(gpu, gpus, nodes, gpu_spec, network_gbps, comparing=compare)
        _fleet_plans(profile, overrides, fleets, price_per_gpu_hour, max_hours, compare=compare, as_json=as_json)
        return
    resolved = _resolved(profile, overrides, doctor=False)
    with phase("plan"):
        memory = None if device_memory is None else int(device_memory * 1024**3)
        plan = build_plan(resolved, runtime_bytes=runtime_rss_bytes(), device_memory=memory)
    if not as_json:
        _print_plan(plan)
    smoke = _smoke(resolved, steps, as_json=as_json) if steps else None
    failure = smoke.failure() if smoke is not None else None
    if as_json:
        data = plan.as_json()
        data["smoke"] = None if smoke is None else {**smoke.__dict__, "estimated_peak_bytes": plan.memory.total}
        write_json(data, failure=failure)
    elif smoke is not None:
        _print_smoke(smoke, plan.memory.total)
    if failure is not None:
        raise failure


class _PlanOnce:
    """Dry-run's memory estimate of the run, made once: for doctor's memory check and the probe."""

    def __init__(self) -> None:
        self._estimate: tuple[int, str | None] | None = None

    def __call__(self, resolved: ResolvedRun) -> tuple[int, str | None]:
        from llavactl.plan import plan_memory

        if self._estimate is None:
            self._estimate = plan_memory(resolved)
        return self._estimate


def _fleet_plans(
    profile: str,
    overrides: list[str] | None,
    fleets: list[Fleet],
    price: str | None,
    max_hours: float | None,
    *,
    compare: bool,
    as_json: bool,
) -> None:
    """dry-run on fleets that are not here: one plan, or (``compare``) a table of them by cost."""
    from llavactl.plan.fleet import parse_prices, plan_fleets
    from llavactl.resolve.gpus import find_gpu

    resolved = _resolved(profile, overrides, doctor=False)
    with phase("plan"):
        comparison = plan_fleets(resolved, fleets, price=parse_prices(price, find_gpu), max_hours=max_hours)
    if as_json:
        write_json(comparison.as_json() if compare else comparison.plans[0].as_json())
    elif compare:
        print_comparison(comparison)
    else:
        print_fleet_plan(comparison.plans[0])


def _resolved(
    profile: str, overrides: list[str] | None, *, doctor: bool, planner: _PlanOnce | None = None
) -> ResolvedRun:
    """What `train` and `dry-run` share: the profile loaded and resolved, then (for train) doctor's
    blocking checks, whose warnings go to stderr."""
    from llavactl.resolve import resolve

    loaded = load(profile, overrides)
    with phase("resolve and doctor's checks" if doctor else "resolve"):
        resolved = resolve(loaded)
        warnings = preflight(resolved, planner or _PlanOnce()) if doctor else []
    if verbosity.level > 0:
        for r in warnings:
            err_console.print(f"[yellow]warning[/] {shown(r.check)}: {shown(r.finding)} Fix: {shown(r.fix or '')}")
    return resolved


def _launch(nproc: int) -> int:
    """Run this same command on ``nproc`` processes of this machine (:mod:`llavactl.train.launch`)."""
    import sys

    from llavactl.train.launch import launch

    if "WORLD_SIZE" in os.environ:
        raise ConfigError(
            f"--nproc-per-node {nproc} in a process that torchrun started (WORLD_SIZE={os.environ['WORLD_SIZE']}).",
            fix="drop `--nproc-per-node`: torchrun's own --nproc-per-node already sets the processes",
        )
    words, argv = [], iter(sys.argv[1:])
    for word in argv:
        if word == "--nproc-per-node":
            next(argv, None)
        elif not word.startswith("--nproc-per-node="):
            words.append(word)
    return launch(nproc, words)


def _smoke(resolved: ResolvedRun, steps: int, *, as_json: bool) -> SmokeResult:
    """`--steps N`: N real steps, a save and a reload, with their progress on stderr under --json."""
    import tempfile
    from pathlib import Path

    from llavactl.train.progress import TrainingProgress
    from llavactl.train.smoke import smoke_run

    out = err_console if as_json else console
    with (
        phase(f"{steps + 1} real steps and a reload"),
        tempfile.TemporaryDirectory(prefix="llavactl-dry-run-") as workdir,
        TrainingProgress(out, quiet=verbosity.level == 0 or as_json) as progress,
    ):
        return smoke_run(resolved, steps, Path(workdir), progress)


def _gib(value: int) -> str:
    return f"{value / 1024**3:.2f} GiB"


def _print_plan(plan: Plan) -> None:
    from rich.table import Table

    from llavactl.plan import STEP_EFFICIENCY

    console.print(f"[bold]Plan for {escape(plan.profile)}[/] (stage {plan.stage}, device {plan.device})")
    table = Table(show_edge=False, pad_edge=False)
    for column in ("component", "parameters", "trainable", "dtype"):
        table.add_column(column, justify="left" if column in ("component", "dtype") else "right")
    for c in plan.components:
        table.add_row(c.name, f"{c.total:,}", f"{c.trainable:,}", ", ".join(c.dtypes))
    total = sum(c.total for c in plan.components)
    trainable = sum(c.trainable for c in plan.components)
    table.add_row("[bold]all", f"{total:,}", f"{trainable:,} ({trainable / total:.2%})", "")
    console.print(table)
    t = plan.tokens
    images = f"{t.image_tokens_per_image} image tokens per image, up to {t.images_per_sample} per record"
    print_wrapped(
        f"Tokens per sample (image tokens included): mean {t.mean:g}, p95 {t.p95}, longest {t.longest}; "
        f"{images}; from {t.source}"
    )
    if t.pad_fraction is not None and t.micro_batch is not None:
        now = "on" if plan.padding_free else "off"
        print_wrapped(
            f"Padding: {t.pad_fraction:.1%} of the tokens of padded batches of {plan.batch_size} records are pad "
            f"tokens; padding-free batches compute none (data.padding_free {now}); a micro-batch computes "
            f"{t.micro_batch.tokens:,.0f} tokens on average"
        )
    if plan.total_steps is not None:
        per_epoch = f"{plan.steps_per_epoch:,} per epoch, " if plan.steps_per_epoch else ""
        exact = plan.global_batch == int(plan.global_batch)
        samples = f"{int(plan.global_batch)}" if exact else f"{plan.global_batch:.1f} (on average)"
        print_wrapped(f"Steps: {per_epoch}{plan.total_steps:,} in all; {samples} samples per step")
    m, other = plan.memory, plan.memory_other_checkpointing
    print_wrapped(
        f"Peak memory per device (estimate): total {_gib(m.total)} = runtime {_gib(m.runtime)} + "
        f"weights {_gib(m.weights)} + gradients {_gib(m.gradients)} + optimizer {_gib(m.optimizer)} + "
        f"activations {_gib(m.activations)}; with gradient checkpointing toggled: {_gib(other.total)}"
    )
    if plan.free_bytes is not None:
        verdict = {
            "fits": "[green]fits[/]",
            "tight": "[yellow]fits, but within the estimate's 20% error[/]",
            "over": "[bold red]does not fit[/]",
        }[plan.fit or "over"]
        console.print(f"Free memory on the device: {_gib(plan.free_bytes)}: {verdict}")
    if plan.suggestions:
        print_wrapped("Overrides that lower the peak, cheapest in quality first (each includes the ones above):")
    for s in plan.suggestions:
        print_wrapped(f"  {_gib(s.peak_bytes):>10}  {s.overrides}  ({s.why})", indent=" " * 14)
    if plan.out_of_reach:
        print_wrapped(
            f"No override brings the estimate under {_gib(plan.free_bytes or 0)}: the runtime and the weights alone "
            f"take {_gib(m.runtime + m.weights)}. Use a device with more memory, or shard the run over several "
            "(docs/distributed.md)."
        )
    flops = f"{plan.flops_per_step / 1e9:,.1f} GFLOP per optimizer step"
    if plan.seconds_per_step is not None and plan.matmul_flops_per_s is not None:
        flops += (
            f"; about {plan.seconds_per_step:.2f} s per step at {STEP_EFFICIENCY:.0%} of this "
            f"device's measured {plan.matmul_flops_per_s / 1e9:.0f} GFLOP/s matmul rate"
        )
    print_wrapped(f"Time: {flops}")
    for note in plan.notes:  # one line each: a note's figures are searched for as printed
        console.print(f"[dim]{shown(note)}[/]", soft_wrap=True)


def _print_smoke(smoke: SmokeResult, estimated: int) -> None:
    kind = "random weights in the real shapes" if smoke.random_weights else "real weights"
    ok = smoke.losses_match and smoke.weights_match
    said = wrapped(
        f"Ran {smoke.steps + 1} steps ({kind}); losses {', '.join(f'{x:.4f}' for x in smoke.losses)}. "
        f"Reloaded checkpoint-{smoke.steps}: step {smoke.steps + 1} loss {smoke.resumed_loss:.4f}, weights "
        f"{'identical' if smoke.weights_match else 'DIFFERENT'}:"
    )
    console.print(f"{said} {'[green]pass[/]' if ok else '[bold red]fail[/]'}", soft_wrap=True)
    console.print(f"Measured peak memory {_gib(smoke.peak_bytes)}; estimated {_gib(estimated)}")
