"""The memory probe: the epoch's most demanding micro-batch once before step 1, measured, compared,
and without a trace in the run that follows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import profile, run_cli, train_recipe
from safetensors.torch import load_file

from llavactl.data.sampling import worst_micro_batch
from llavactl.model.assembly import build_llava
from llavactl.train import probe


def metrics_losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{f.name}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_the_probe_runs_on_cuda_by_default_and_on_a_cpu_when_asked() -> None:
    assert probe.probe_enabled(profile("tiny").profile, "cuda") is True
    assert probe.probe_enabled(profile("tiny").profile, "cpu") is False
    assert probe.probe_enabled(profile("tiny", "training.memory_probe=true").profile, "cpu") is True
    assert probe.probe_enabled(profile("tiny", "training.memory_probe=false").profile, "cuda") is False


def test_the_worst_micro_batch_is_the_longest_records_or_the_fullest_budget() -> None:
    lengths = np.array([5, 9, 0, 9, 3, 7, 12])  # record 2 does not build
    assert worst_micro_batch(lengths, profile("tiny", "training.per_device_train_batch_size=3").profile) == [6, 1, 3]
    budget = profile("tiny", "data.padding_free=true", "data.max_seq_len=20", "data.max_tokens_per_batch=25").profile
    assert worst_micro_batch(lengths, budget) == [6, 1, 4]  # 12 + 9 + 3: filled longest first, as binning fills
    assert worst_micro_batch(np.array([20, 20, 4, 1]), budget) == [0, 2, 3]


@pytest.mark.slow
def test_a_run_with_the_probe_trains_bit_for_bit_as_one_without(tmp_path: Path) -> None:
    # LoRA's dropout draws from the global RNG, and so may dry-run's estimate, which the probe makes
    # itself under --skip-doctor: both draw inside the probe, which puts the states back.
    common = ["train", "-p", "tiny", "stage=lora", "training.max_steps=6", "training.logging_steps=1", "--skip-doctor"]
    code, plain_out, _ = run_cli([*common, f"training.output_dir={tmp_path / 'plain'}"])
    assert code == 0
    code, probed_out, _ = run_cli([*common, f"training.output_dir={tmp_path / 'probed'}", "--probe"])
    assert code == 0 and "Memory probe:" in probed_out and "Memory probe:" not in plain_out  # off on a CPU
    assert "dry-run estimated" in " ".join(probed_out.split())
    losses = [metrics_losses(tmp_path / name) for name in ("plain", "probed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    a, b = (checkpoint_tensors(tmp_path / name / "checkpoint-6") for name in ("plain", "probed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_same_run_without_restoring_the_random_states_would_differ(tmp_path: Path, monkeypatch) -> None:
    """The bit-for-bit test above can fail: the probe does draw random numbers (LoRA dropout)."""
    common = ["stage=lora", "training.max_steps=3", "training.logging_steps=1"]
    plain, _ = train_recipe([*common, f"training.output_dir={tmp_path / 'plain'}"])
    monkeypatch.setattr(probe, "restore_rng", lambda states: None)
    careless, _ = train_recipe([*common, f"training.output_dir={tmp_path / 'c'}", "training.memory_probe=true"])
    assert careless.losses != plain.losses


def test_the_probe_measures_the_batch_and_counts_the_adamw_states_to_come(tmp_path: Path, monkeypatch) -> None:
    seen: list[probe.ProbeResult] = []
    real = probe.run_probe
    monkeypatch.setattr("llavactl.train.recipe.run_probe", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    args = [
        "stage=lora",
        "training.max_steps=1",
        "training.per_device_train_batch_size=3",
        "training.memory_probe=true",
    ]
    _, out = train_recipe([*args, f"training.output_dir={tmp_path}"])
    [result] = seen
    lora = build_llava(profile("tiny", "stage=lora").profile.model, "lora", image_size=None, seed=0)
    trainable = sum(p.numel() for p in lora.model.parameters() if p.requires_grad)
    assert result.records == 3 and result.optimizer_bytes == 2 * 4 * trainable  # two fp32 moments per weight
    assert result.measured_bytes > 0 and result.fits is True and result.estimate is None
    assert result.projected_bytes == result.measured_bytes + result.optimizer_bytes
    assert f"({result.records} records, {result.tokens:,} tokens)" in " ".join(out.split())


def test_a_probe_that_does_not_fit_stops_the_run_before_step_1_with_the_overrides(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(probe, "_capacity", lambda device: 2**20)  # 1 MiB to be had
    args = ["train", "-p", "tiny", "--probe", f"training.output_dir={tmp_path}", "training.max_steps=2"]
    code, out, err = run_cli(args)
    text = " ".join((out + err).split())
    assert code == 1, text
    assert "Before step 1: the memory probe's micro-batch (4 records" in text and "of the 1.0 MiB to be had" in text
    assert "dry-run estimated" in text  # the estimate doctor's check made, printed beside the measurement
    assert "use less memory per step:" in text and "training.per_device_train_batch_size=" in text
    assert not list(tmp_path.glob("checkpoint-*"))
    assert "Checkpoints already in" not in text  # none were made
    # The fix it names is taken in the same folder: the stopped run left nothing to lose.
    monkeypatch.undo()
    code, out, err = run_cli([*args[:3], f"training.output_dir={tmp_path}", "training.max_steps=1"])
    assert code == 0, out + err


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_a_worst_record_that_does_not_build_is_skipped_or_stops_the_run_as_in_training(
    shapes_data, tmp_path: Path, on_error: str
) -> None:
    """The longest record's image is damaged: under `skip` the next-longest takes its place, under
    `raise` the run stops naming the record, as it would when the record's turn came."""
    data = shapes_data(8)
    records = json.loads(data.read_text())
    longest = max(range(len(records)), key=lambda i: len(json.dumps(records[i])))
    records[longest]["conversations"][1]["value"] += " and a much longer answer" * 8
    records[longest]["image"] = "images/broken.png"
    (tmp_path / "images").mkdir()
    for image in (data.parent / "images").iterdir():
        (tmp_path / "images" / image.name).write_bytes(image.read_bytes())
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data.json").write_text(json.dumps(records))
    args = ["train", "-p", "tiny", "--probe", "--skip-doctor", f"data.data_path={tmp_path / 'data.json'}"]
    args += [f"data.image_folder={tmp_path}", f"data.on_error={on_error}", "training.max_steps=1"]
    code, out, err = run_cli([*args, f"training.output_dir={tmp_path / 'run'}"])
    text = " ".join((out + err).split())
    if on_error == "skip":
        assert code == 0 and "Memory probe: the epoch's most demanding micro-batch (4 records" in text, text
    else:
        assert code == 2 and f"record {longest}" in text and "Internal error" not in text, text


def test_a_resume_may_add_or_drop_the_probe(tmp_path: Path) -> None:
    args = ["train", "-p", "tiny", f"training.output_dir={tmp_path}", "training.max_steps=4", "training.save_steps=2"]
    assert run_cli([*args, "training.max_steps=4"])[0] == 0
    code, out, err = run_cli([*args, "--probe", "--resume", str(tmp_path / "checkpoint-2")])
    assert code == 0 and "Memory probe:" in out, out + err
