"""Quality of the `tiny` profile: does a model trained by `llavactl train --profile tiny` see colours?

Trains with tiny's default settings (`llavactl train --profile tiny --output-dir TMP`, timed), then
runs `llavactl eval --profile tiny --model TMP --json` on the held-out shapes
(`builtin:shapes-eval`: images training never sees). Side by side, the same eval runs on the
untrained model (the seeded initial weights, saved as a checkpoint), so the share shows what
training added. Both are commands in subprocesses, as a user would run them.

    python benchmarks/tiny_quality.py [--quick] [--override KEY=VALUE ...]

Goal: the trained model names the right colour in at least 80% of its answers. `--quick` trains
one epoch and evaluates on 48 held-out records (under a minute; its shares say nothing about the
goal). `--override` passes training overrides, to try what would reach the goal. The last line of
stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL_COLOUR_SHARE = 0.8
LLAVACTL = [sys.executable, "-m", "llavactl"]


def save_untrained(run_dir: Path, overrides: list[str]) -> None:
    """A checkpoint of the tiny model as training starts: its seeded initial weights."""
    from llavactl.config.loader import load_profile
    from llavactl.model.assembly import build_llava
    from llavactl.model.weights import save_trainable
    from llavactl.train.checkpoint import save_checkpoint

    profile = load_profile("tiny", overrides).profile
    assembled = build_llava(profile.model, profile.stage, image_size=profile.data.image_size, seed=profile.seed)
    save_checkpoint(
        run_dir,
        0,
        write_weights=lambda folder: save_trainable(assembled, folder),
        training_state={},
        progress={"step": 0, "profile": profile.model_dump(mode="json")},
        save_total_limit=None,
    )


def evaluate(model: Path, eval_overrides: list[str]) -> dict[str, Any]:
    command = [*LLAVACTL, "eval", "--profile", "tiny", *eval_overrides, "--model", str(model), "--json"]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    report = json.loads(done.stdout)
    return {
        "colour_share": report["colour"]["share"],
        "colour_asked": report["colour"]["asked"],
        "shape_share": report["shape"]["share"],
        "loss": round(report["loss"], 4),
        "perplexity": round(report["perplexity"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one epoch, 48 held-out records (< 1 min)")
    parser.add_argument("--override", action="append", default=[], help="a training override KEY=VALUE")
    args = parser.parse_args()
    train_overrides = [*(["training.num_train_epochs=1"] if args.quick else []), *args.override]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        eval_overrides: list[str] = []
        if args.quick:
            from llavactl.data.synth import write_shapes

            held_out = write_shapes(root / "held-out", n=48, seed=12345)
            eval_overrides = [f"data.eval_data_path={held_out}"]
        started = time.perf_counter()
        subprocess.run(
            [*LLAVACTL, "-q", "train", "--profile", "tiny", *train_overrides, "--output-dir", str(root / "run")],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        train_seconds = time.perf_counter() - started
        trained = evaluate(root / "run", eval_overrides)
        save_untrained(root / "untrained", train_overrides)
        untrained = evaluate(root / "untrained", eval_overrides)

    result = {
        "benchmark": "tiny_quality",
        "quick": args.quick,
        "train_overrides": train_overrides,
        "train_seconds": round(train_seconds, 1),
        "trained": trained,
        "untrained": untrained,
        "goal_colour_share": GOAL_COLOUR_SHARE,
        "goal_met": None if args.quick else trained["colour_share"] >= GOAL_COLOUR_SHARE,
    }
    print(
        f"colour named right: trained {trained['colour_share']:.1%}, untrained {untrained['colour_share']:.1%} "
        f"(goal {GOAL_COLOUR_SHARE:.0%}); training took {train_seconds:.1f} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
