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
    assert final["mfu_peak_source"] == "measured float32 matmul (steady peak)"


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
    assert utilisation.device_peak(h100) == utilisation.DevicePeak(67e12, "H100 SXM 80GB datasheet, fp32 dense")
    measured: list[tuple[str, str]] = []
    monkeypatch.setattr(
        "llavactl.model.flops.measure_matmul_flops", lambda device, dtype: measured.append((device, dtype)) or 5e12
    )
    odd = replace(T4, gpus=[GpuFacts("Some New GPU", 10**10, 10**10, (9, 0))])
    said = "measured float16 matmul (steady peak)"
    assert utilisation.device_peak(resolve(profile("t4_qlora"), odd, ONE)).source == said
    assert utilisation.device_peak(resolve(profile("tiny"), CPU, ONE)).flops_per_s == 5e12
    native = replace(CPU, cpu_flags=frozenset({"amx_bf16"}))
    utilisation.device_peak(resolve(profile("tiny", "training.bf16=true"), native, ONE))
    # A bf16 run on a CPU is reported against the bf16 rate, an fp32 run against the fp32 rate.
    assert measured == [("cuda", "float16"), ("cpu", "float32"), ("cpu", "bfloat16")]


def test_the_peak_is_the_best_this_machine_has_shown_so_a_busy_moment_cannot_inflate_mfu(cache: Path) -> None:
    from llavactl.model.flops import PEAKS_FILE, steady_peak

    key = "Some CPU | cpu | 2 threads | torch x | float32"
    assert steady_peak(key, 300e9) == 300e9  # the first measurement is kept
    assert steady_peak(key, 120e9) == 300e9  # measured while another process held the cores
    assert steady_peak(key, 350e9) == 350e9  # a better one raises it
    assert steady_peak("Other CPU | cpu | 2 threads | torch x | float32", 90e9) == 90e9  # filed per machine
    kept = json.loads((cache.parent / PEAKS_FILE).read_text())
    assert kept[key] == 350e9 and len(kept) == 2
    (cache.parent / PEAKS_FILE).write_text("{not json")
    assert steady_peak(key, 100e9) == 100e9  # a damaged file costs the steadiness only
