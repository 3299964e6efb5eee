"""Measuring bf16 against fp32 on this CPU (for doctor): the timer, the linear layer's rates, and
the figure kept in llavactl's cache. Real measurements; no assertion on how fast anything is."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llavactl.model import flops


def test_best_seconds_times_each_call_in_turn_after_a_warm_up_and_stops_at_the_budget() -> None:
    order: list[str] = []
    best = flops.best_seconds(lambda: order.append("a"), lambda: order.append("b"), runs=3)
    assert order == ["a", "b"] * 4  # one untimed round, then three timed ones
    assert len(best) == 2 and all(0 < s < math.inf for s in best)
    order.clear()
    flops.best_seconds(lambda: order.append("a"), runs=100, budget_s=0.0, warm_up=False)
    assert order == ["a"]  # a spent budget ends the runs after the first


def test_linear_rates_measure_fp32_and_bf16_for_real() -> None:
    fp32, bf16 = flops.linear_rates(256, 64, 128, budget_s=0.2)
    assert 0 < fp32 < math.inf and 0 < bf16 < math.inf
    # A spent budget still times one call of each.
    assert all(0 < rate < math.inf for rate in flops.linear_rates(300, 32, 64, budget_s=0.0))


def test_a_wide_layer_is_measured_on_a_slice_of_its_rows_and_outputs_with_its_whole_width(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    import torch.nn.functional as F

    real, seen = F.linear, set()

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        seen.add((tuple(x.shape), tuple(w.shape), x.dtype, torch.get_num_threads()))
        return real(x, w)

    monkeypatch.setattr(F, "linear", linear)
    threads = torch.get_num_threads()
    flops.linear_rates(2048, 4096, 11008, budget_s=0.0)  # a 7B LLM's MLP
    assert seen == {((256, 4096), (1024, 4096), dtype, 1) for dtype in (torch.float32, torch.bfloat16)}
    assert torch.get_num_threads() == threads  # timed on one thread, then handed back


def test_bf16_speedup_is_measured_once_then_read_from_the_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    speed = flops.bf16_speedup(128, 32, 64)
    assert (speed.tokens, speed.width, speed.out) == (128, 32, 64)
    assert speed.fp32_flops_per_s > 0 and speed.bf16_flops_per_s > 0
    assert speed.speedup == speed.bf16_flops_per_s / speed.fp32_flops_per_s
    kept = json.loads((cache.parent / flops.PEAKS_FILE).read_text())
    keys = {f"{flops.machine_key('cpu', dtype)} | linear 128x32->64" for dtype in ("float32", "bfloat16")}
    assert set(kept) == keys  # filed per machine, threads, torch, dtype and shapes

    def measure_again(*args: object, **kwargs: object) -> tuple[float, float]:
        raise AssertionError("measured again")

    monkeypatch.setattr(flops, "linear_rates", measure_again)
    assert flops.bf16_speedup(128, 32, 64) == speed
