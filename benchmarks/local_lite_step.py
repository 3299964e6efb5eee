"""One training step in local_lite's real shapes on this CPU, fp32 and bf16 side by side: seconds, FLOP/s, peak RSS.

Random weights in the shapes of CLIP ViT-L/14-336 (frozen tower) and SmolLM-135M (LoRA r16 on
q/k/v/o, projector mlp2x_gelu trained), one record of 576 image tokens plus text, batch 1 (`--image-
size 224` gives 256 image tokens through interpolated position embeddings). Four configurations:
fp32 and bf16 (the forward under CPU bf16 autocast with the frozen weights in bf16, as
`training.bf16=true` trains), each with and without gradient checkpointing, each in its own
process so that its peak RSS is its own. The bf16 rows run only on a CPU with native bf16
(AVX512-BF16 or AMX): elsewhere bf16 is emulated, several times slower than fp32, and the goals
below are not judged. The step is llavactl's own unit, :class:`llavactl.train.step.TrainingStep`
(the one the recipe runs and the planner traces): loss normalised by the supervised tokens,
backward, clipping, fused AdamW over ``build_optimizer``'s groups. FLOPs are counted on one step
by llavactl's FLOP counter (torch's formulas plus the CPU attention kernels it does not know,
causal ones credited with the pairs they compute) and divided by the measured step time; the
reference is this machine's matmul FLOP/s (a 2048x2048 matmul) in the step's precision, so the
ratio says how much of the CPU the step uses. The matmul rate is measured in the same process for
half a second before and after each timed step and each step is set against the mean of its two:
a laptop or shared machine drifts by up to 30% within a minute, and a rate taken at another moment
would move the ratio by as much. The median step counts. With checkpointing the recomputed forward
counts as work (the CPU does it); the gc rows also give the share counting only the model's FLOPs
(those of the step without checkpointing).

The goals of issue 28, judged on a CPU with native bf16: bf16 at least 3x faster than fp32
(`bf16_speedup`, fp32 s/step over bf16 s/step) and the bf16 step at least 25% of the bf16 matmul
rate measured beside it (`bf16_fraction_of_bf16_matmul_peak`), with and without checkpointing;
and the older fp32 goal, 75% of the fp32 matmul rate (`fp32_goal_met`).

    python benchmarks/local_lite_step.py [--quick] [--steps N] [--text-tokens T] [--image-size S]

`--quick` (under a minute on 2 cores) shows that the set-up works and judges nothing: one cold
step per configuration at 168 px (unless `--image-size`), all in this process (so the peak RSS
is the process's so far, not each configuration's).
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

GOAL_BF16_SPEEDUP = 3.0
GOAL_BF16_FRACTION = 0.25
GOAL_FP32_FRACTION = 0.75
QUICK_IMAGE_SIZE = 168


def matmul_flops_per_s(seconds: float, bf16: bool = False, n: int = 2048) -> float:
    """The mean rate of n x n matmuls (in bf16 or fp32) run for ``seconds``, after a warm-up."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm up the kernel and threads
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - start)


def build_model(gradient_checkpointing: bool, image_size: int | None, bf16: bool = False) -> tuple[Any, Any]:
    """LLaVA in local_lite's shapes with seeded random weights, assembled by llavactl for its `lora` stage
    (with ``bf16``, its frozen weights in bf16, as `training.bf16=true` trains)."""
    import torch

    from llavactl.config.loader import load_profile
    from llavactl.model.assembly import build_llava

    profile = load_profile("local_lite").profile
    assembled = build_llava(
        profile.model,
        profile.stage,
        image_size=image_size,
        seed=0,
        gradient_checkpointing=gradient_checkpointing,
        random_weights=True,
        compute_dtype=torch.bfloat16 if bf16 else None,
    )
    assembled.model.train()
    return assembled, assembled.model.config


def one_record(assembled: Any, config: Any, text_tokens: int) -> dict[str, Any]:
    """A batch of one record: the image's tokens after BOS, then text whose second half is supervised."""
    import torch

    image_tokens, side = assembled.image_spec.num_tokens, assembled.image_spec.size
    input_ids = torch.randint(0, config.text_config.vocab_size - 2, (1, image_tokens + text_tokens))
    input_ids[0, 1 : 1 + image_tokens] = config.image_token_id
    labels = input_ids.clone()
    labels[0, : 1 + image_tokens + text_tokens // 2] = -100  # prompt and image masked, reply supervised
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(1, 3, side, side),
    }


def child(
    gradient_checkpointing: bool,
    steps: int,
    text_tokens: int,
    quick: bool,
    image_size: int | None,
    bf16: bool,
) -> dict[str, Any]:
    """One configuration: ``steps`` timed steps (after a warm-up step unless ``quick``), each set
    against the matmul rate in the step's precision around it, then the FLOPs of one step."""
    import torch

    from llavactl.config.schema import TrainingConfig
    from llavactl.model.flops import op_flop_counter
    from llavactl.resolve import Precision
    from llavactl.train.loss import TokenLoss
    from llavactl.train.optimizer import build_optimizer
    from llavactl.train.step import TrainingStep

    assembled, config = build_model(gradient_checkpointing, image_size, bf16)
    model = assembled.model
    rss_before_steps = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    optimizer = build_optimizer(assembled.parameter_groups(), TrainingConfig(learning_rate=2e-4))
    batch = one_record(assembled, config, text_tokens)
    seq, side = batch["input_ids"].shape[1], assembled.image_spec.size
    unit = TrainingStep(
        TokenLoss(model),
        optimizer,
        precision=Precision(autocast="bf16" if bf16 else None),
        device=torch.device("cpu"),
        max_grad_norm=1.0,
    )

    def step() -> None:
        unit([batch])

    if not quick:
        step()  # allocator, fused kernels, thread pool
    window = 0.25 if quick else 0.5
    times, around = [], [matmul_flops_per_s(window, bf16)]
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        around.append(matmul_flops_per_s(window, bf16))
    rates = [(before + after) / 2 for before, after in itertools.pairwise(around)]
    # The median: a shared or throttled moment on a laptop moves the mean by a whole step's worth.
    seconds = statistics.median(times)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    # Counted last: the counter's bookkeeping must not add to the timing or to the peak RSS.
    counter = op_flop_counter()
    with counter:
        step()
    flops = float(counter.total)
    return {
        "s_per_step": seconds,
        "s_per_step_mean": statistics.fmean(times),
        "step_seconds": times,
        "matmul_flops_per_s": statistics.median(rates),
        "matmul_rates": rates,
        "flops_per_step": flops,
        "achieved_flops_per_s": flops / seconds,
        "fraction_of_matmul_peak": statistics.median(flops / t / r for t, r in zip(times, rates, strict=True)),
        "peak_rss_gib": peak_rss,
        "peak_rss_before_steps_gib": rss_before_steps,
        "seq_len": seq,
        "image_size": side,
    }


def summary(results: dict[str, dict[str, Any]], *, quick: bool, bf16_isa: str | None) -> dict[str, Any]:
    """The goals' ratios and verdicts from the configurations' figures (keyed `fp32_no_gc`,
    `bf16_gc`, ...), and every figure. ``bf16_isa``: the CPU's native bf16 (None: emulated, no bf16
    rows). goal_met is None where it is not judged, with the reason in goal_not_judged."""
    from llavactl.resolve.run import CPU_BF16_EMULATED

    gcs = ("no_gc", "gc")
    bf16 = all(f"bf16_{gc}" in results for gc in gcs)
    speedup = fraction = None
    if bf16:
        speedup = {gc: results[f"fp32_{gc}"]["s_per_step"] / results[f"bf16_{gc}"]["s_per_step"] for gc in gcs}
        fraction = {gc: results[f"bf16_{gc}"]["fraction_of_matmul_peak"] for gc in gcs}
    if quick:
        not_judged = "--quick: one cold step per configuration shows the set-up works; it is not the measurement"
    elif bf16_isa is None:
        # Null, not false: the goals are set for CPUs with native bf16, which this one cannot fail or meet.
        not_judged = f"{CPU_BF16_EMULATED}; the goals are for CPUs with AVX512-BF16 or AMX, so no bf16 rows ran"
    else:
        not_judged = None
    goal_met = None
    if not_judged is None and speedup is not None and fraction is not None:
        goal_met = all(speedup[gc] >= GOAL_BF16_SPEEDUP and fraction[gc] >= GOAL_BF16_FRACTION for gc in gcs)
    fp32 = [results[f"fp32_{gc}"]["fraction_of_matmul_peak"] for gc in gcs]
    return {
        "benchmark": "local_lite_step",
        "quick": quick,
        "native_bf16": bf16_isa is not None,
        "bf16_isa": bf16_isa,
        "bf16_speedup": speedup,
        "bf16_fraction_of_bf16_matmul_peak": fraction,
        "goal_bf16_speedup": GOAL_BF16_SPEEDUP,
        "goal_bf16_fraction_of_bf16_matmul_peak": GOAL_BF16_FRACTION,
        "goal_met": goal_met,
        "goal_not_judged": not_judged,
        "goal_fp32_fraction_of_matmul_peak": GOAL_FP32_FRACTION,
        "fp32_goal_met": None if quick else all(f >= GOAL_FP32_FRACTION for f in fp32),
        **{f"{name}_{k}": v for name, r in results.items() for k, v in r.items()},
    }


def run_child(gc: str, args: argparse.Namespace, steps: int, bf16: bool) -> dict[str, Any]:
    """A configuration in a process of its own, so that its peak RSS is its own."""
    command = [sys.executable, __file__, "--child", gc, "--steps", str(steps), "--text-tokens", str(args.text_tokens)]
    command += [*(["--image-size", str(args.image_size)] if args.image_size else []), *(["--bf16"] * bf16)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"one cold step per configuration at {QUICK_IMAGE_SIZE} px, in this process (< 1 min; judges nothing)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (the median counts)")
    parser.add_argument("--text-tokens", type=int, default=128, help="text tokens after the image")
    parser.add_argument("--image-size", type=int, help="data.image_size (default: the tower's own, 336)")
    # One configuration, for cpu_knobs.py and for this script's own processes.
    parser.add_argument("--child", choices=["gc", "no_gc"], help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 1 if args.quick else args.steps
    if args.child:
        result = child(args.child == "gc", steps, args.text_tokens, args.quick, args.image_size, args.bf16)
        print(json.dumps(result))
        return

    import torch

    from llavactl.resolve.facts import probe

    isa = probe().cpu_bf16_isa
    if args.quick:
        args.image_size = args.image_size or QUICK_IMAGE_SIZE
    results: dict[str, dict[str, Any]] = {}
    for bf16 in (False, True) if isa else (False,):
        for gc in ("no_gc", "gc"):
            name = f"{'bf16' if bf16 else 'fp32'}_{gc}"
            if args.quick:
                results[name] = child(gc == "gc", steps, args.text_tokens, True, args.image_size, bf16)
            else:
                results[name] = run_child(gc, args, steps, bf16)
            r = results[name]
            print(
                f"{name:10s} {r['s_per_step']:.2f} s/step, {r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s "
                f"({r['fraction_of_matmul_peak']:.0%} of the {name[:4]} matmul rate around it, "
                f"{min(r['matmul_rates']) / 1e9:.1f}-{max(r['matmul_rates']) / 1e9:.1f} GFLOP/s), "
                f"peak RSS {r['peak_rss_gib']:.2f} GiB ({r['peak_rss_before_steps_gib']:.2f} GiB before the steps)",
                flush=True,
            )
    for precision in ("fp32", "bf16"):
        if f"{precision}_gc" not in results:
            continue
        gc, model_flops = results[f"{precision}_gc"], results[f"{precision}_no_gc"]["flops_per_step"]
        pairs = zip(gc["step_seconds"], gc["matmul_rates"], strict=True)
        gc["model_fraction_of_matmul_peak"] = statistics.median(model_flops / t / rate for t, rate in pairs)
        print(f"{precision}_gc    {gc['model_fraction_of_matmul_peak']:.0%} of matmul counting model FLOPs only")
    print(json.dumps({"threads": torch.get_num_threads(), **summary(results, quick=args.quick, bf16_isa=isa)}))


if __name__ == "__main__":
    main()
