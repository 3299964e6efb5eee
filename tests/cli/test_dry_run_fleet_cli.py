"""`llavactl dry-run --gpu/--gpus/--compare`: one fleet's plan, the comparison, their JSON and errors."""

from __future__ import annotations

import json

from helpers import run_cli


def test_an_unknown_gpu_exits_2_with_the_list_of_known_ones(capsys) -> None:
    code, _, err = run_cli(["dry-run", "--profile", "tiny", "--gpu", "mi300x"], capsys)
    assert code == 2
    err = " ".join(err.split())
    assert "no GPU is called `mi300x`" in err and "a100-80gb" in err and "h100-sxm" in err
    assert "--gpu-spec" in err and "Traceback" not in err


def test_several_fleets_without_compare_are_refused(capsys) -> None:
    code, _, err = run_cli(["dry-run", "--profile", "tiny", "--gpu", "l4", "--gpus", "1,2"], capsys)
    assert code == 2 and "--compare" in " ".join(err.split())


def test_a_fleet_plan_as_json(shapes, capsys) -> None:
    args = ["dry-run", "--profile", "tiny", f"data.data_path={shapes}", "--gpu", "L4", "--gpus", "2", "--json"]
    code, out, err = run_cli([*args, "--price-per-gpu-hour", "0.8"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["fleet"]["gpu"] == "l4" and data["fleet"]["gpus_per_node"] == 2 and data["fleet"]["nodes"] == 1
    assert data["fits"] is True and data["strategy"] in ("ddp", "fsdp")
    assert data["micro_batch"] * data["gradient_accumulation_steps"] * 2 == data["global_batch"]
    assert data["gpu_hours"] == data["run_hours"] * 2
    assert abs(data["cost_usd"] - data["gpu_hours"] * 0.8) < 1e-9
    assert data["memory_per_gpu"]["total"] == sum(v for k, v in data["memory_per_gpu"].items() if k != "total")
    assert data["launch"]["command"].startswith("llavactl train --profile tiny --nproc-per-node 2 ")
    assert 0 < data["efficiency"] < 1 and data["seconds_per_step"] > 0


def test_compare_as_json_is_sorted_and_marks_the_cheapest(shapes, capsys) -> None:
    args = ["dry-run", "--profile", "tiny", f"data.data_path={shapes}", "--compare", "--gpu", "l4,h100"]
    code, out, err = run_cli([*args, "--gpus", "1,4", "--price-per-gpu-hour", "l4=0.8,h100=3", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    costs = [f["cost_usd"] for f in data["fleets"]]
    assert len(costs) == 4 and costs == sorted(costs) and data["sorted_by"] == "cost"
    assert data["cheapest"] == 0 and data["fleets"][0]["cost_usd"] == min(costs)


def test_compare_prints_the_table_and_the_cheapest_launch_line(shapes, capsys) -> None:
    args = ["dry-run", "--profile", "tiny", f"data.data_path={shapes}", "--compare", "--gpu", "l4,a100-80gb"]
    code, out, err = run_cli([*args, "--gpus", "1,2", "--max-hours", "100"], capsys)
    assert code == 0, err
    assert "cheapest, in time" in out and "by GPU-hours" in out and "llavactl train --profile tiny" in out
