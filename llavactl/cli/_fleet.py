"""How dry-run shows a plan on fleets that are not here: one fleet's plan, or the comparison table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.markup import escape

from llavactl.cli._common import console, print_wrapped, shown

if TYPE_CHECKING:
    from llavactl.plan.fleet import Comparison, FleetPlan

_FIT = {"fits": "[green]fits[/]", "tight": "[yellow]fits, but within the estimate's 20% error[/]"}


def _gib(value: float) -> str:
    return f"{value / 1024**3:.1f} GiB"


def _hours(value: float | None) -> str:
    """Three significant figures, whole hours from 1,000; under a hundredth, just that."""
    if value is None:
        return "n/a"
    if value < 0.01:
        return "<0.01"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def _usd(value: float | None) -> str:
    if value is None:
        return ""
    return f"${value:,.0f}" if value >= 100 else "<$0.01" if value < 0.01 else f"${value:.2f}"


def print_fleet_plan(plan: FleetPlan) -> None:
    f, c = plan.fleet, plan.choice
    gpu = f.gpu
    nodes = f"{f.nodes} nodes" if f.nodes > 1 else "1 node"
    console.print(
        f"[bold]Plan for {escape(plan.profile)} on {escape(f.name)}[/] ({escape(gpu.name)}, "
        f"{_gib(gpu.memory_bytes)} each; {nodes}; {escape(gpu.link)})",
        soft_wrap=True,
    )
    print_wrapped(f"Tokens per sample from {plan.tokens_source}")
    if c is None:
        console.print("[bold red]No strategy fits[/] this fleet:")
    else:
        shards = f"sharded over {f.world} GPUs" if c.strategy == "fsdp" else "a full replica on each GPU"
        checkpointing = "on" if c.checkpointing else "off"
        kept = ", kept from training.distributed" if plan.strategy_kept else ""
        print_wrapped(
            f"Strategy: {c.strategy} ({shards}{kept}); micro-batch {c.micro_batch} x {c.accumulation} accumulation "
            f"x {f.world} GPU{'s' if f.world > 1 else ''} = global batch {plan.global_batch:g}; gradient "
            f"checkpointing {checkpointing}"
        )
        m = c.memory
        print_wrapped(
            f"Memory per GPU (estimate): total {_gib(m.total)} = CUDA context {_gib(m.context)} + weights "
            f"{_gib(m.weights)} + gradients {_gib(m.gradients)} + optimizer {_gib(m.optimizer)} + buffers "
            f"{_gib(m.buffers)} + activations {_gib(m.activations)} + allocator reserve {_gib(m.reserve)}"
        )
        console.print(f"  of {_gib(gpu.memory_bytes)}: {_FIT[c.fit]}")
    for strategy, why in plan.others.items():
        print_wrapped(f"  {strategy}: {why}", indent="    ")
    if c is not None:
        comm = c.communication
        compute = c.accumulation * c.micro_seconds
        sent = (comm.per_micro_batch_bytes * c.accumulation + comm.per_step_bytes) / 1e9
        print_wrapped(
            f"Time: {c.flops_per_step / 1e12:,.0f} TFLOP per step at {gpu.efficiency:.0%} of "
            f"{plan.peak_flops / 1e12:,.1f} TFLOP/s ({plan.precision}, dense) per GPU: compute {compute:.2f} s + "
            f"communication not hidden {max(c.seconds_per_step - compute, 0):.2f} s (each GPU sends {sent:.1f} GB "
            "a step) = "
            f"{c.seconds_per_step:.2f} s per step; {plan.tokens_per_second_per_gpu or 0:,.0f} tokens/s per GPU"
        )
        if plan.total_steps is None:
            print_wrapped("Run: the number of steps is not known (no data here): set training.max_steps for hours")
        else:
            cost = (
                f"; ${plan.cost_usd:,.2f} at ${plan.price_per_gpu_hour:g} per GPU-hour"
                if plan.cost_usd is not None
                else "; add --price-per-gpu-hour USD for the cost"
            )
            print_wrapped(
                f"Run: {plan.total_steps:,} steps, {_hours(plan.run_hours)} hours, "
                f"{_hours(plan.gpu_hours)} GPU-hours{cost}"
            )
        print_wrapped(f"Efficiency {gpu.efficiency:.0%}: {gpu.efficiency_source}")
    if plan.launch is not None:
        several = (
            f", the same line on each of the {f.nodes} nodes (HEAD_NODE: the address of one of them, JOB_ID: an "
            "id for the job; training.output_dir on storage they all see)"
        )
        print_wrapped(f"Launch{several if 'torchrun' in plan.launch else ''}:")
        for key in ("command", "torchrun"):
            if key in plan.launch:
                console.print(f"  {shown(plan.launch[key])}", soft_wrap=True)
        if "slurm" in plan.launch:
            console.print("SLURM batch script (one task per node):")
            console.print(shown(plan.launch["slurm"]), soft_wrap=True)
    for note in plan.notes:
        console.print(f"[dim]{shown(note)}[/]", soft_wrap=True)


def print_comparison(comparison: Comparison) -> None:
    from rich import box
    from rich.table import Table

    plans = comparison.plans
    if not plans:
        return
    console.print(
        f"[bold]Fleets for {escape(plans[0].profile)}[/], by {comparison.by}; "
        f"tokens from {shown(plans[0].tokens_source)}",
        soft_wrap=True,
    )
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("fleet", "fits", "GiB/GPU", "hours", "GPU-h", "cost", ""):
        table.add_column(column, justify="left" if column in ("fleet", "fits", "") else "right", no_wrap=True)
    for i, plan in enumerate(plans):
        c = plan.choice
        marks = []
        if c is not None and c.fit == "tight":
            marks.append("tight")
        if i == comparison.cheapest:
            marks.append("cheapest")
        if i == comparison.cheapest_in_time:
            marks.append("in time")
        fits = "no" if c is None else f"{c.strategy} {c.micro_batch}x{c.accumulation}{' gc' if c.checkpointing else ''}"
        table.add_row(
            escape(plan.fleet.name),
            fits,
            "" if c is None else f"{c.memory.total / 1024**3:.1f}",
            _hours(plan.run_hours) if c else "",
            _hours(plan.gpu_hours) if c else "",
            _usd(plan.cost_usd),
            ", ".join(marks),
        )
    console.print(table)
    if comparison.cheapest is None:
        print_wrapped("No fleet of these fits (or the run's steps are not known: set training.max_steps).")
    elif comparison.max_hours is not None and comparison.cheapest_in_time is None:
        print_wrapped(f"No fleet that fits finishes within {comparison.max_hours:g} hours.")
    best = plans[comparison.cheapest] if comparison.cheapest is not None else None
    if best is not None and best.launch is not None:
        print_wrapped(f"The cheapest, {best.fleet.name}, runs with:")
        console.print(f"  {shown(best.launch.get('command') or best.launch['torchrun'])}", soft_wrap=True)
    within = (
        f"; in time: the cheapest within {comparison.max_hours:g} hours" if comparison.max_hours is not None else ""
    )
    print_wrapped(
        f"fits: strategy, micro-batch x accumulation per GPU, gc: gradient checkpointing; tight: within the "
        f"estimate's 20% error; 2x8: 2 nodes of 8 GPUs"
        f"{within}. `--gpu NAME --gpus N` shows one fleet's plan in full."
    )
