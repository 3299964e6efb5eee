"""benchmarks/local_lite_step.py: fp32 and bf16 side by side, the goals of issue 28 as ratios with
their verdict in the last-line JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llavactl.resolve.run import CPU_BF16_EMULATED

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "local_lite_step.py"
_spec = importlib.util.spec_from_file_location("local_lite_step", SCRIPT)
step_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_benchmark)


def _row(s_per_step: float, fraction: float) -> dict[str, Any]:
    return {"s_per_step": s_per_step, "fraction_of_matmul_peak": fraction}


def _results(bf16_gc_seconds: float = 2.5, bf16_fraction: float = 0.3) -> dict[str, dict[str, Any]]:
    return {
        "fp32_no_gc": _row(6.0, 0.8),
        "fp32_gc": _row(7.5, 0.78),
        "bf16_no_gc": _row(2.0, bf16_fraction),
        "bf16_gc": _row(bf16_gc_seconds, 0.27),
    }


def test_the_goals_are_ratios_of_the_same_run_and_met_only_when_both_hold_with_and_without_checkpointing():
    met = step_benchmark.summary(_results(), quick=False, bf16_isa="AMX-BF16")
    assert met["bf16_speedup"] == {"no_gc": 3.0, "gc": 3.0}
    assert met["bf16_fraction_of_bf16_matmul_peak"] == {"no_gc": 0.3, "gc": 0.27}
    assert (met["goal_bf16_speedup"], met["goal_bf16_fraction_of_bf16_matmul_peak"]) == (3.0, 0.25)
    assert met["goal_met"] is True and met["goal_not_judged"] is None
    assert met["native_bf16"] is True and met["fp32_goal_met"] is True
    assert met["bf16_gc_s_per_step"] == 2.5  # every figure, under its configuration's name
    slow_gc = step_benchmark.summary(_results(bf16_gc_seconds=3.0), quick=False, bf16_isa="AMX-BF16")
    assert slow_gc["bf16_speedup"]["gc"] == 2.5 and slow_gc["goal_met"] is False
    thin = step_benchmark.summary(_results(bf16_fraction=0.2), quick=False, bf16_isa="AVX512-BF16")
    assert thin["goal_met"] is False


def test_quick_and_a_cpu_without_native_bf16_report_the_goals_but_judge_nothing_and_say_why():
    quick = step_benchmark.summary(_results(), quick=True, bf16_isa="AMX-BF16")
    assert quick["bf16_speedup"] == {"no_gc": 3.0, "gc": 3.0}
    assert quick["goal_met"] is None and quick["fp32_goal_met"] is None
    assert quick["goal_not_judged"].startswith("--quick: one cold step")
    fp32_only = {k: v for k, v in _results().items() if k.startswith("fp32")}
    emulated = step_benchmark.summary(fp32_only, quick=False, bf16_isa=None)
    assert emulated["native_bf16"] is False and emulated["bf16_speedup"] is None
    assert emulated["goal_met"] is None and emulated["goal_not_judged"].startswith(CPU_BF16_EMULATED)
    assert emulated["fp32_goal_met"] is True


@pytest.mark.slow
def test_quick_run_ends_with_one_json_line_of_the_goals() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "local_lite_step" and summary["quick"] is True and summary["goal_met"] is None
    assert summary["fp32_no_gc_image_size"] == 168 and summary["fp32_gc_s_per_step"] > 0
    assert (summary["bf16_speedup"] is None) is (not summary["native_bf16"])
