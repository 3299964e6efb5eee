"""Utilisation beside the loss: achieved FLOP/s and MFU in metrics.jsonl, the progress line and run.json;
counting a step's FLOPs does not change what it computes; the peak a run is measured against."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import A100, CPU, EIGHT_GPUS, ONE, T4, profile, train_recipe

from llavactl.resolve import GpuFacts, resolve
from llavactl.train import utilisation


def _settings(shapes: Path, out: Path) -> list[str]:
    return [
        f"data.data_path={shapes}",
        f"training.output_dir={out}",
        "training.max_steps=4",
        "training.logging_steps=1",
    ]


def test_every_logged_step_after_the_counted_one_carries_flops_and_mfu(shapes: Path, tmp_path: Path) -> None:
    _, text = train_recipe(_settings(shapes, tmp_path))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "mfu" not in logged[0]  # step 1's FLOPs are being counted: its own rate is left out
    for record in logged[1:]:
        assert record["flops_per_s"] > 1e6 and 0 < record["mfu"] < 2
    assert "| MFU " in text
    final = json.loads((tmp_path / "run.json").read_text())["final_metrics"]
    assert final["mfu"] == pytest.approx(final["flops_per_s"] / final["mfu_peak_flops_per_s"])
    assert final["mfu_peak_source"] == "measured float32 matmul"


def test_counting_the_first_step_changes_nothing_it_computes(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    counted, _ = train_recipe(_settings(shapes, tmp_path / "counted"))

    @contextlib.contextmanager
    def not_counted(self, batches):  # type: ignore[no-untyped-def]
        yield

    monkeypatch.setattr(utilisation.StepFlops, "count", not_counted)
    plain, _ = train_recipe(_settings(shapes, tmp_path / "plain"))
    assert counted.losses == plain.losses
    a = load_file(tmp_path / "counted" / "checkpoint-4" / "trainable.safetensors")
    b = load_file(tmp_path / "plain" / "checkpoint-4" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_later_steps_are_credited_by_their_shapes() -> None:
    flops = utilisation.StepFlops()
    batch = {"input_ids": torch.zeros(2, 100, dtype=torch.long)}
    with flops.count([batch]):
        torch.mm(torch.ones(8, 8), torch.ones(8, 8))  # 1,024 FLOPs, none of them attention
    assert flops.ready and flops.of([batch]) == 1024
    assert flops.of([{"input_ids": torch.zeros(4, 100, dtype=torch.long)}]) == 2048  # twice the tokens


def test_the_peak_is_the_datasheets_for_known_gpus_in_the_runs_precision_else_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert utilisation.device_peak(resolve(profile("finetune"), A100, ONE)).flops_per_s == 312e12  # bf16
    h100 = resolve(profile("finetune", "training.bf16=false", "training.tf32=false"), EIGHT_GPUS, ONE)
    assert utilisation.device_peak(h100) == utilisation.DevicePeak(67e12, "H100 datasheet, fp32 dense")
    measured: list[tuple[str, str]] = []
    monkeypatch.setattr(
        "llavactl.model.flops.measure_matmul_flops", lambda device, dtype: measured.append((device, dtype)) or 5e12
    )
    odd = replace(T4, gpus=[GpuFacts("Some New GPU", 10**10, 10**10, (9, 0))])
    assert utilisation.device_peak(resolve(profile("t4_qlora"), odd, ONE)).source == "measured float16 matmul"
    assert utilisation.device_peak(resolve(profile("tiny"), CPU, ONE)).flops_per_s == 5e12
    assert measured == [("cuda", "float16"), ("cpu", "float32")]
