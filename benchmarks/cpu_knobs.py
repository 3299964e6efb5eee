"""CPU knobs side by side: image size x precision x gradient checkpointing, in local_lite's shapes.

Every configuration is one `benchmarks/local_lite_step.py` child process (random weights in
CLIP ViT-L/14-336 + SmolLM-135M shapes, LoRA stage, one record of image tokens plus 128 text
tokens, batch 1), so each peak RSS is that configuration's own. The reference is local_lite's own
setting, 336 px in fp32 with gradient checkpointing, measured in the same run; every other row is
given as a speed-up and a memory ratio against it.

    python benchmarks/cpu_knobs.py [--quick] [--steps N]

`--quick` (under a minute) times one step, with no warm-up step, of 336 and 168 px in fp32 and bf16
without checkpointing; its speed-ups are against 336 px fp32 without checkpointing. The full run
has 12 configurations (336/224/168 px, fp32/bf16, with/without checkpointing) and takes a few
minutes. The last line of stdout is one JSON object, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

STEP_BENCHMARK = Path(__file__).with_name("local_lite_step.py")


def machine() -> dict[str, Any]:
    """The CPU this ran on: model name, torch threads, and whether it has native bf16."""
    import torch

    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    native_bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return {"cpu": name, "torch_threads": torch.get_num_threads(), "native_bf16": native_bf16 or None}


def run(size: int, bf16: bool, gc: bool, steps: int, quick: bool) -> dict[str, float]:
    command = [sys.executable, str(STEP_BENCHMARK), "--child", "gc" if gc else "no_gc", "--image-size", str(size)]
    command += ["--steps", str(steps), *(["--bf16"] if bf16 else []), *(["--quick"] if quick else [])]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {"s_per_step": result["s_per_step"], "peak_rss_gib": result["peak_rss_gib"], "seq_len": result["seq_len"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 configurations, one step each (< 1 min)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after one warm-up)")
    args = parser.parse_args()
    if args.quick:
        grid = list(itertools.product((336, 168), (False, True), (False,)))
        reference_key = "336_fp32_no_gc"
    else:
        grid = list(itertools.product((336, 224, 168), (False, True), (True, False)))
        reference_key = "336_fp32_gc"
    rows: dict[str, dict[str, Any]] = {}
    for size, bf16, gc in grid:
        key = f"{size}_{'bf16' if bf16 else 'fp32'}_{'gc' if gc else 'no_gc'}"
        rows[key] = {"image_size": size, "bf16": bf16, "gradient_checkpointing": gc}
        rows[key] |= run(size, bf16, gc, 1 if args.quick else args.steps, args.quick)
        row = rows[key]
        print(f"{key:16s} {row['s_per_step']:6.2f} s/step  peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    reference = rows[reference_key]
    print(f"\nagainst {reference_key} ({reference['s_per_step']:.2f} s/step, {reference['peak_rss_gib']:.2f} GiB):")
    print("| image size | image tokens + text | precision | gradient checkpointing | s/step | speed-up | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for row in rows.values():
        row["speedup"] = round(reference["s_per_step"] / row["s_per_step"], 3)
        row["rss_ratio"] = round(row["peak_rss_gib"] / reference["peak_rss_gib"], 3)
        print(
            f"| {row['image_size']} | {row['seq_len']} | {'bf16 autocast' if row['bf16'] else 'fp32'} | "
            f"{'on' if row['gradient_checkpointing'] else 'off'} | {row['s_per_step']:.2f} | "
            f"{row['speedup']:.2f}x | {row['peak_rss_gib']:.2f} GiB |"
        )
    print(json.dumps({"benchmark": "cpu_knobs", "machine": machine(), "reference": reference_key, "rows": rows}))


if __name__ == "__main__":
    main()
