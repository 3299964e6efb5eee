"""LoRA dropout on a CPU: torch's `nn.Dropout` against llavactl's `SparseDropout`, side by side.

Both at p=0.05 on local_lite's LoRA inputs (704 tokens x 576): the forward and backward of one
call, the two alternating, best of several rounds. Without `--quick` also whole training steps in
local_lite's shapes (random weights, LoRA on q/k/v/o of SmolLM-135M, frozen CLIP ViT-L/14-336 tower,
one image plus 128 text tokens), the two dropouts swapped into the same model and alternating step
by step, with and without gradient checkpointing (which draws every mask a second time); the median
step of each counts.

    python benchmarks/lora_dropout.py [--quick] [--rounds N]

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

P = 0.05


def per_call_ms(rounds: int) -> dict[str, float]:
    import torch

    from llavactl.model.dropout import SparseDropout

    layers = {"nn_dropout": torch.nn.Dropout(P), "sparse_dropout": SparseDropout(P)}
    inputs = [torch.randn(1, 704, 576, requires_grad=True) for _ in range(16)]  # more than the caches hold
    grad = torch.randn(1, 704, 576)
    best = dict.fromkeys(layers, float("inf"))
    for _ in range(rounds):
        for name, layer in layers.items():
            start = time.perf_counter()
            for x in inputs:
                layer(x).backward(grad)
            best[name] = min(best[name], (time.perf_counter() - start) / len(inputs) * 1e3)
    return best


def step_seconds(gradient_checkpointing: bool, rounds: int) -> dict[str, float]:
    import torch
    from peft.tuners.lora.layer import LoraLayer

    sys.path.insert(0, str(Path(__file__).parent))
    from local_lite_step import build_model, one_record

    from llavactl.config.schema import TrainingConfig
    from llavactl.model.dropout import SparseDropout
    from llavactl.train.loss import summed_token_loss
    from llavactl.train.optimizer import build_optimizer

    assembled, config = build_model(gradient_checkpointing, None)
    model = assembled.model
    optimizer = build_optimizer(assembled.parameter_groups(), TrainingConfig(learning_rate=2e-4))
    batch = one_record(assembled, config, text_tokens=128)
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]

    def step() -> float:
        start = time.perf_counter()
        (summed_token_loss(model, batch) / supervised).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    kinds: dict[str, Any] = {"nn_dropout": torch.nn.Dropout, "sparse_dropout": SparseDropout}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    step()  # warm-up
    for _ in range(rounds):
        for name, kind in kinds.items():
            for layer in lora_layers:
                layer.lora_dropout["default"] = kind(P)
            times[name].append(step())
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the per-call comparison only (seconds)")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of whole steps (default 4)")
    args = parser.parse_args()
    calls = per_call_ms(rounds=5)
    summary: dict[str, Any] = {"benchmark": "lora_dropout", "p": P, "quick": args.quick}
    summary |= {f"{name}_ms_per_call": round(ms, 3) for name, ms in calls.items()}
    summary["per_call_speedup"] = round(calls["nn_dropout"] / calls["sparse_dropout"], 2)
    print(
        f"one call, forward + backward: nn.Dropout {calls['nn_dropout']:.2f} ms, "
        f"SparseDropout {calls['sparse_dropout']:.2f} ms ({summary['per_call_speedup']}x)"
    )
    if not args.quick:
        for gc in (False, True):
            label = "gc" if gc else "no_gc"
            steps = step_seconds(gc, args.rounds)
            summary |= {f"{label}_{name}_s_per_step": round(s, 3) for name, s in steps.items()}
            summary[f"{label}_step_speedup"] = round(steps["nn_dropout"] / steps["sparse_dropout"], 3)
            print(
                f"local_lite step, checkpointing {'on' if gc else 'off'}: nn.Dropout {steps['nn_dropout']:.2f} s, "
                f"SparseDropout {steps['sparse_dropout']:.2f} s ({summary[f'{label}_step_speedup']}x)",
                flush=True,
            )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
