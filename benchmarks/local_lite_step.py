"""One training step in local_lite's real shapes on this CPU: seconds, FLOP/s, peak RSS.

Random weights in the shapes of CLIP ViT-L/14-336 (frozen tower) and SmolLM-135M (LoRA r16 on
q/k/v/o, projector mlp2x_gelu trained), one record of 576 image tokens plus text, batch 1 (`--image-
size 224` gives 256 image tokens through interpolated position embeddings; `--bf16` runs the forward
under CPU bf16 autocast, as `training.bf16=true` does). Each configuration (with and without
gradient checkpointing) runs in its own process so that its peak RSS is its own. The step is
llavactl's own unit, :class:`llavactl.train.step.TrainingStep` (the one the recipe runs and the
planner traces): loss normalised by the supervised tokens, backward, clipping, fused AdamW over
``build_optimizer``'s groups. FLOPs are counted on one step by llavactl's `flop_counter` (torch's
FlopCounterMode plus the CPU attention kernels it does not know, causal ones credited with the pairs
they compute) and divided by the measured step time; the reference is this machine's fp32 matmul
FLOP/s (a 2048x2048 matmul), so the ratio says how much of the CPU the step uses. The matmul rate is
measured in the same process for half a second before and after each timed step and each step is set
against the mean of its two: a laptop or shared machine drifts by up to 30% within a minute, and a
rate taken at another moment would move the ratio by as much. The median step counts. With
checkpointing the recomputed forward counts as work (the CPU does it); the gc line also gives the
share counting only the model's FLOPs (those of the step without checkpointing).

    python benchmarks/local_lite_step.py [--quick] [--steps N] [--text-tokens T] [--image-size S] [--bf16]

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


def matmul_flops_per_s(seconds: float, n: int = 2048) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
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
    gradient_checkpointing: bool, steps: int, text_tokens: int, warmup: bool, image_size: int | None, bf16: bool
) -> dict[str, float]:
    import torch

    from llavactl.config.schema import TrainingConfig
    from llavactl.model.flops import flop_counter
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

    if warmup:
        step()  # allocator, fused kernels, thread pool
    times, around = [], [matmul_flops_per_s(0.5)]
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        around.append(matmul_flops_per_s(0.5))
    rates = [(before + after) / 2 for before, after in itertools.pairwise(around)]
    # The median: a shared or throttled moment on a laptop moves the mean by a whole step's worth.
    seconds = statistics.median(times)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    # Counted last: the counter's bookkeeping must not add to the timing or to the peak RSS.
    counter = flop_counter()
    with counter:
        step()
    flops = counter.get_total_flops()
    return {
        "s_per_step": seconds,
        "s_per_step_mean": statistics.fmean(times),
        "step_seconds": times,
        "matmul_flops_per_s": statistics.median(rates),
        "matmul_rates": rates,
        "flops_per_step": float(flops),
        "achieved_flops_per_s": flops / seconds,
        "fraction_of_matmul_peak": statistics.median(flops / t / r for t, r in zip(times, rates, strict=True)),
        "peak_rss_gib": peak_rss,
        "peak_rss_before_steps_gib": rss_before_steps,
        "seq_len": seq,
        "image_size": side,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one timed step per configuration, no warm-up step (< 1 min; the goal is not judged)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (the median counts)")
    parser.add_argument("--text-tokens", type=int, default=128, help="text tokens after the image")
    parser.add_argument("--image-size", type=int, help="data.image_size (default: the tower's own, 336)")
    parser.add_argument("--bf16", action="store_true", help="the forward under CPU bf16 autocast")
    parser.add_argument("--child", choices=["gc", "no_gc"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = 1 if args.quick else args.steps
    if args.child:
        result = child(args.child == "gc", steps, args.text_tokens, not args.quick, args.image_size, args.bf16)
        print(json.dumps(result))
        return

    import torch

    results: dict[str, dict[str, Any]] = {}
    for name in ("no_gc", "gc"):
        command = [sys.executable, __file__, "--child", name, "--steps", str(steps)]
        command += ["--text-tokens", str(args.text_tokens), *(["--quick"] if args.quick else [])]
        command += [*(["--image-size", str(args.image_size)] if args.image_size else []), *(["--bf16"] * args.bf16)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    rates = [rate for r in results.values() for rate in r["matmul_rates"]]
    print(
        f"fp32 matmul (2048^3) on {torch.get_num_threads()} threads, around each step: "
        f"{min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f} GFLOP/s"
    )
    for name, r in results.items():
        print(
            f"{name:6s} {r['s_per_step']:.2f} s/step, {r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"({r['fraction_of_matmul_peak']:.0%} of matmul), peak RSS {r['peak_rss_gib']:.2f} GiB "
            f"({r['peak_rss_before_steps_gib']:.2f} GiB before the first step)"
        )
    gc, model_flops = results["gc"], results["no_gc"]["flops_per_step"]
    pairs = zip(gc["step_seconds"], gc["matmul_rates"], strict=True)
    gc["model_fraction_of_matmul_peak"] = statistics.median(model_flops / t / rate for t, rate in pairs)
    print(f"gc     {gc['model_fraction_of_matmul_peak']:.0%} of matmul counting model FLOPs, not the recomputation")
    goal = 0.75
    summary = {
        "benchmark": "local_lite_step",
        "threads": torch.get_num_threads(),
        "bf16_autocast": args.bf16,
        "goal_fraction_of_matmul_peak": goal,
        # One cold step (--quick) shows the set-up works; it is not the measurement.
        "goal_met": None if args.quick else all(r["fraction_of_matmul_peak"] >= goal for r in results.values()),
        **{f"{name}_{k}": v for name, r in results.items() for k, v in r.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
