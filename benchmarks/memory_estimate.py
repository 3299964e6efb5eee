"""dry-run's peak-memory estimate against the measured peak RSS of real training steps, side by side.

Cases: the `tiny` profile (real builtin weights, its own data, three steps of the real recipe),
and local_lite's shapes (CLIP ViT-L/14-336 + SmolLM-135M with random weights, LoRA, one image
and 128 text tokens a sample, 64 of them supervised) with and without gradient checkpointing.
Each measurement runs in a fresh process, so its peak RSS is that of training alone.
Goal: every estimate within 20% of the measurement.

    python benchmarks/memory_estimate.py [--quick]

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

TEXT_TOKENS = 128
SUPERVISED = 64


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_tiny(steps: int) -> int:
    """Peak RSS of `llavactl train --profile tiny` for a few steps, in this (fresh) process."""
    from rich.console import Console

    from llavactl.config.loader import load_profile
    from llavactl.train.progress import TrainingProgress
    from llavactl.train.recipe import TrainRecipe

    with tempfile.TemporaryDirectory() as out:
        loaded = load_profile("tiny", [f"training.max_steps={steps}", f"training.output_dir={out}"])
        with TrainingProgress(Console(quiet=True), quiet=True) as progress:
            recipe = TrainRecipe(loaded, progress)
            recipe.setup()
            recipe.train()
            recipe.cleanup()
    return _peak_rss_bytes()


def measure_local_lite(steps: int, gradient_checkpointing: bool) -> int:
    """Peak RSS of training steps in local_lite's shapes with random weights (the loop's loss and optimizer)."""
    import torch

    from llavactl.config.loader import load_profile
    from llavactl.model.assembly import build_llava
    from llavactl.train.loss import summed_token_loss
    from llavactl.train.optimizer import build_optimizer

    profile = load_profile("local_lite", [f"training.gradient_checkpointing={str(gradient_checkpointing).lower()}"])
    p = profile.profile
    assembled = build_llava(
        p.model,
        p.stage,
        image_size=p.data.image_size,
        seed=0,
        gradient_checkpointing=gradient_checkpointing,
        random_weights=True,
    )
    optimizer = build_optimizer(assembled.parameter_groups(), p.training)
    image_tokens = assembled.image_spec.num_tokens
    ids = torch.randint(3, 1000, (1, image_tokens + TEXT_TOKENS))
    ids[0, 1 : 1 + image_tokens] = assembled.image_token_id
    labels = torch.full_like(ids, -100)
    labels[0, -SUPERVISED:] = ids[0, -SUPERVISED:]
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(1, 3, assembled.image_spec.size, assembled.image_spec.size),
    }
    assembled.model.train()
    for _ in range(steps):
        loss = summed_token_loss(assembled.model, batch) / SUPERVISED
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _peak_rss_bytes()


def estimate(case: str) -> int:
    """dry-run's estimate of the same case (in this fresh process, as dry-run would)."""
    from llavactl.config.loader import load_profile
    from llavactl.plan import build as plan
    from llavactl.plan.memory import runtime_rss_bytes

    runtime = runtime_rss_bytes()
    if case == "tiny":
        profile = load_profile("tiny").profile
        tokens = plan.token_plan(profile, plan.build_meta(profile, gradient_checkpointing=False))
    else:
        gc = case == "local_lite_gc"
        profile = load_profile("local_lite", [f"training.gradient_checkpointing={str(gc).lower()}"]).profile
        tokens = plan.TokenPlan(
            "benchmark", None, None, 576, 1, 576 + TEXT_TOKENS, 576 + TEXT_TOKENS, 576 + TEXT_TOKENS, SUPERVISED
        )
    memory, _ = plan.estimate(profile, tokens, runtime_bytes=runtime)
    return memory.total


def _child(args: list[str]) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    ).stdout
    return int(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny and local_lite with checkpointing only (< 1 min)")
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, case = args.child
        if what == "estimate":
            print(estimate(case))
        elif case == "tiny":
            print(measure_tiny(steps=3))
        else:
            print(measure_local_lite(steps=2, gradient_checkpointing=case == "local_lite_gc"))
        return
    cases = ["tiny", "local_lite_gc"] + ([] if args.quick else ["local_lite_no_gc"])
    figures: dict[str, float] = {}
    worst = 0.0
    for case in cases:
        measured = _child(["measure", case])
        estimated = _child(["estimate", case])
        error = estimated / measured - 1
        worst = max(worst, abs(error))
        print(
            f"{case:18s} estimated {estimated / 2**30:6.2f} GiB  measured peak RSS {measured / 2**30:6.2f} GiB  "
            f"({error:+.0%})"
        )
        figures |= {
            f"{case}_estimated_gib": round(estimated / 2**30, 3),
            f"{case}_measured_gib": round(measured / 2**30, 3),
            f"{case}_error": round(error, 3),
        }
    print(
        json.dumps(
            {
                "benchmark": "memory_estimate",
                **figures,
                "worst_abs_error": round(worst, 3),
                "goal_abs_error": 0.2,
                "goal_met": worst <= 0.2,
            }
        )
    )


if __name__ == "__main__":
    main()
