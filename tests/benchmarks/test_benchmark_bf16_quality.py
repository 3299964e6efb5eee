"""benchmarks/bf16_quality.py: issue 28's quality goals (bf16 against fp32) as figures with their
verdict in the last-line JSON."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the script imports its neighbours local_lite_step and tiny_quality
_spec = importlib.util.spec_from_file_location("bf16_quality", BENCHMARKS / "bf16_quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def _local_lite(bf16_losses: list[float]) -> dict[str, dict[str, Any]]:
    return {"fp32": {"losses": [10.0, 8.0, 5.0], "s_per_step": 6.0}, "bf16": {"losses": bf16_losses, "s_per_step": 2.0}}


def _tiny(bf16_loss: float = 0.105, bf16_colour: float = 0.94, fp32_colour: float = 0.955) -> dict[str, dict[str, Any]]:
    return {
        "fp32": {"loss": 0.1, "colour_share": fp32_colour},
        "bf16": {"loss": bf16_loss, "colour_share": bf16_colour},
    }


def test_the_goals_hold_when_every_step_and_the_eval_are_within_their_bands() -> None:
    met = quality.summary(_local_lite([10.1, 7.9, 5.05]), _tiny(), quick=False)
    assert met["local_lite_rel_loss_diff"] == pytest.approx([0.01, 0.0125, 0.01])
    assert met["local_lite_max_rel_loss_diff"] == pytest.approx(0.0125)
    assert met["tiny_eval_loss_rel_diff"] == pytest.approx(0.05)
    assert met["tiny_colour_points_diff"] == pytest.approx(1.5)
    assert met["goal_met"] is True and met["goal_not_judged"] is None
    assert met["local_lite_bf16_losses"] == [10.1, 7.9, 5.05] and met["tiny_bf16_loss"] == 0.105


@pytest.mark.parametrize(
    ("local_lite", "tiny"),
    [
        ([10.1, 7.9, 5.2], _tiny()),  # one step 4% off: every step counts, not the mean
        ([10.0, 8.0, 5.0], _tiny(bf16_loss=0.089)),  # 11% lower is outside the band too
        ([10.0, 8.0, 5.0], _tiny(bf16_colour=0.92)),  # 3.5 points
    ],
)
def test_one_figure_outside_its_band_misses_the_goal(local_lite: list[float], tiny: dict[str, Any]) -> None:
    assert quality.summary(_local_lite(local_lite), tiny, quick=False)["goal_met"] is False


def test_quick_judges_nothing() -> None:
    quick = quality.summary(_local_lite([10.0, 8.0, 5.0]), _tiny(), quick=True)
    assert quick["goal_met"] is None and quick["goal_not_judged"].startswith("--quick")


def test_a_difference_of_exactly_3_points_is_within_the_band() -> None:
    # 98% and 95% of 200 answers: 3.0000000000000027 points in floats.
    assert quality.summary(_local_lite([10.0, 8.0, 5.0]), _tiny(bf16_colour=0.98, fp32_colour=0.95), quick=False)[
        "goal_met"
    ]
