"""`llavactl --help` wall time against importing its light dependencies, side by side.

Goal: `llavactl --help` within 2x of `python -c "import typer, rich, pydantic, yaml"`.
Each command runs in a fresh interpreter, alternating, and the medians are compared; each figure
is shown with its range (fastest and slowest run).
Usage: python benchmarks/cli_startup.py [--quick]. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "llavactl_help": [sys.executable, "-m", "llavactl", "--help"],
    "profiles_list": [sys.executable, "-m", "llavactl", "profiles", "list"],
    "reference_imports": [sys.executable, "-c", "import typer, rich, pydantic, yaml"],
}


def _time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 runs each instead of 20")
    args = parser.parse_args()
    runs = 5 if args.quick else 20
    for argv in COMMANDS.values():  # warm the OS file cache and .pyc files
        _time(argv)
    samples: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(runs):
        for name, argv in COMMANDS.items():
            samples[name].append(_time(argv))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratio = medians["llavactl_help"] / medians["reference_imports"]
    for name, value in medians.items():
        low, high = min(samples[name]), max(samples[name])
        print(f"{name:18s} median {value * 1000:7.1f} ms (range {low * 1000:.1f}-{high * 1000:.1f}) over {runs} runs")
    print(f"llavactl --help / reference imports = {ratio:.2f}x (goal <= 2.0x)")
    result: dict[str, object] = {f"{k}_ms": round(v * 1000, 1) for k, v in medians.items()}
    result.update({f"{k}_range_ms": [round(min(v) * 1000, 1), round(max(v) * 1000, 1)] for k, v in samples.items()})
    result.update(runs=runs, ratio=round(ratio, 3), goal_ratio=2.0, goal_met=ratio <= 2.0)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
