"""The training loop on the builtin tiny models: stages learn, resume is exact, failures are clean."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import interrupt_at, train_recipe

from llavactl.errors import CheckFailed, TrainingError
from llavactl.train import checkpoint, loss
from llavactl.train.recipe import TrainResult


@pytest.fixture(scope="module")
def shapes24(shapes_data: Callable[..., Path]) -> Path:
    return shapes_data(24)


def _overrides(shapes24: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.data_path={shapes24}",
        f"training.output_dir={output_dir}",
        "training.per_device_train_batch_size=2",
        "training.gradient_accumulation_steps=2",
        "training.learning_rate=1e-2",
        "training.max_steps=10",
        "training.warmup_ratio=null",
        "training.warmup_steps=2",
        "training.logging_steps=1",
        "training.save_steps=100",
        *extra,
    ]


def _train(overrides: list[str], *, resume: str | None = None, force: bool = False) -> tuple[TrainResult, str]:
    return train_recipe(overrides, resume=resume, force=force)


@pytest.mark.parametrize(
    "stage_overrides",
    [["stage=projector"], ["stage=lora"], ["stage=full"]],
    ids=["projector", "lora", "full"],
)
def test_every_stage_trains_and_its_loss_falls(shapes24: Path, tmp_path: Path, stage_overrides: list[str]) -> None:
    result, _ = _train(_overrides(shapes24, tmp_path, *stage_overrides))
    assert result.status == "completed"
    assert len(result.losses) == 10
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_run_reports_milestones_metrics_and_run_json(shapes24: Path, tmp_path: Path) -> None:
    result, text = _train(_overrides(shapes24, tmp_path, "training.max_steps=-1", "training.num_train_epochs=2"))
    lines = text.splitlines()
    assert lines[0].startswith("Loading model: builtin:tiny-llama + builtin:tiny-clip (stage full)")
    assert lines[1].startswith("Model loaded in ")
    assert f"Data set processed: 24 records from {shapes24}, 12 batches of 2 per epoch" in lines[2]
    assert lines[3] == "Epoch 1/2"
    assert lines[4].startswith("step 1/12 | epoch 0.17 | loss ")
    assert "Epoch 2/2" in lines
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert [m["loss"] for m in metrics] == result.losses
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["seed"] == 0 and run["device"]["type"] == "cpu"
    assert run["profile"]["data"]["data_path"] == str(shapes24)
    assert run["final_metrics"]["final_loss"] == result.losses[-1]
    assert {"torch", "transformers", "peft"} <= set(run["versions"])


def test_loss_is_normalised_by_the_supervised_tokens_of_the_whole_step(shapes24: Path, tmp_path: Path) -> None:
    # One step of 2 micro-batches of 2 equals one micro-batch of 4: the same tokens, weighed the same.
    accumulated, _ = _train(_overrides(shapes24, tmp_path / "a", "training.max_steps=3"))
    single, _ = _train(
        _overrides(
            shapes24,
            tmp_path / "b",
            "training.max_steps=3",
            "training.per_device_train_batch_size=4",
            "training.gradient_accumulation_steps=1",
        )
    )
    assert accumulated.losses == pytest.approx(single.losses, rel=1e-5)


@pytest.mark.slow
def test_interrupted_then_resumed_run_matches_one_run_bit_for_bit(
    shapes24: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dropout draws from the RNG and 10 steps of 2x2 records cross the 24-record epoch: the RNG,
    # data position, optimizer and schedule all have to come back exactly.
    common = ["stage=lora", "model.lora_dropout=0.1"]
    whole, _ = _train(_overrides(shapes24, tmp_path / "whole", *common))
    with monkeypatch.context() as m:
        interrupt_at(m, 5, signal.SIGINT)
        first, text = _train(_overrides(shapes24, tmp_path / "split", *common))
    assert (first.status, first.step, first.exit_code) == ("interrupted", 5, 130)
    said = " ".join(text.split())
    assert "Ctrl-C: stopping after this step to save a checkpoint" in said
    # No checkpoint before step 5 (save_steps is larger): a kill during the save would leave none.
    assert "the run has no checkpoint yet and would start from step 0" in said
    assert re.search(r"checkpoint-5 complete \d+\.\d s after the stop signal", said)
    assert first.checkpoint == tmp_path / "split" / "checkpoint-5"
    second, _ = _train(_overrides(shapes24, tmp_path / "split", *common), resume="auto")
    assert first.losses + second.losses == whole.losses
    assert len(second.losses) == 5
    metrics = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == whole.losses


def test_the_first_line_logged_after_a_resume_averages_the_steps_it_would_have(shapes24: Path, tmp_path: Path) -> None:
    """Logged every 3 steps, resumed from step 4: the line of step 6 is the mean of steps 4-6, as
    without the interruption (it was the mean of 5-6 alone)."""
    import shutil

    extra = ("training.logging_steps=3", "training.save_steps=4", "training.save_total_limit=null")
    _train(_overrides(shapes24, tmp_path / "whole", *extra))
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    _train(_overrides(shapes24, tmp_path / "split", *extra), resume=str(tmp_path / "split" / "checkpoint-4"))

    def logged(run: str) -> list[tuple[int, float, float]]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(m["step"], m["loss"], m["grad_norm"]) for m in map(json.loads, lines)]

    assert [step for step, *_ in logged("whole")] == [3, 6, 9, 10]
    assert logged("split") == logged("whole")


def test_sigterm_saves_a_checkpoint_and_stops(shapes24: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_at(monkeypatch, 2, signal.SIGTERM)
    result, text = _train(_overrides(shapes24, tmp_path))
    assert (result.status, result.step, result.exit_code) == ("interrupted", 2, 143)
    assert "(a second SIGTERM stops without saving)" in text
    assert checkpoint.read_progress(tmp_path / "checkpoint-2")["step"] == 2
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are put back


def test_resume_with_a_changed_profile_shows_the_diff_and_needs_force(shapes24: Path, tmp_path: Path) -> None:
    _train(_overrides(shapes24, tmp_path, "training.max_steps=4", "training.save_steps=2"))
    shutil.rmtree(tmp_path / "checkpoint-4")
    changed = _overrides(shapes24, tmp_path, "training.max_steps=4", "training.learning_rate=5e-3")
    with pytest.raises(CheckFailed, match=r"training.learning_rate: 0.01 -> 0.005") as info:
        _train(changed, resume="auto")
    assert "--force" in (info.value.fix or "")
    forced, text = _train(changed, resume=str(tmp_path / "checkpoint-2"), force=True)
    assert "Resuming with changed settings (--force): training.learning_rate" in text
    assert (forced.step, len(forced.losses)) == (4, 2)


def test_forced_resume_trains_at_the_new_learning_rate_from_the_resumed_step(shapes24: Path, tmp_path: Path) -> None:
    constant = ["training.lr_scheduler_type=constant", "training.warmup_steps=0", "training.save_steps=2"]
    _train(_overrides(shapes24, tmp_path, "training.max_steps=4", *constant))
    shutil.rmtree(tmp_path / "checkpoint-4")
    seen: list[list[float]] = []
    real_step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append([group["lr"] for group in optimizer.param_groups])
        return real_step(optimizer, *args, **kwargs)

    changed = _overrides(shapes24, tmp_path, "training.max_steps=4", "training.learning_rate=1e-5", *constant)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", recording_step)
        _train(changed, resume=str(tmp_path / "checkpoint-2"), force=True)
    assert seen and all(lr == pytest.approx(1e-5) for step in seen for lr in step)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["lr"], 10) for r in logged if r["step"] > 2] == [1e-5, 1e-5]
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["profile"]
    assert saved["training"]["learning_rate"] == 1e-5


def test_a_failure_after_set_up_is_recorded_as_failed_in_run_json(
    shapes24: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(model, batch):  # type: ignore[no-untyped-def]
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(loss, "summed_token_loss", out_of_memory)
    with pytest.raises(TrainingError):
        _train(_overrides(shapes24, tmp_path))
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "failed" and "ran out of RAM" in run["final_metrics"]["error"]


def test_non_finite_loss_skips_the_step_and_training_goes_on(
    shapes24: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = loss.summed_token_loss

    def nan_on_third_step(model, batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        value = real(model, batch)
        return value * math.nan if calls["n"] in (5, 6) else value  # both micro-batches of step 3

    monkeypatch.setattr(loss, "summed_token_loss", nan_on_third_step)
    result, text = _train(_overrides(shapes24, tmp_path, "training.max_steps=5"))
    assert result.status == "completed" and result.bad_steps == 1
    assert math.isnan(result.losses[2]) and all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)
    assert "Step 3: non-finite loss or gradient (nan); step skipped (1 in a row, 1 in all)" in text
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["bad_steps"] == 1


def test_too_many_bad_steps_in_a_row_stop_and_keep_the_last_good_checkpoint(
    shapes24: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = loss.summed_token_loss

    def nan_from_step_five(model, batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        value = real(model, batch)
        return value * math.inf if calls["n"] > 8 else value

    monkeypatch.setattr(loss, "summed_token_loss", nan_from_step_five)
    overrides = _overrides(shapes24, tmp_path, "training.save_steps=2", "training.max_bad_steps=3")
    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite loss") as info:
        _train(overrides)
    assert f"The last good checkpoint, {tmp_path / 'checkpoint-4'}, is kept." in info.value.message
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("stage", [["stage=full"], ["stage=lora", "model.lora_dropout=0.1"]])
def test_gradient_checkpointing_recomputes_without_changing_the_losses(
    shapes24: Path, tmp_path: Path, stage: list[str]
) -> None:
    # With LoRA dropout the recomputation must draw the same masks again.
    plain, _ = _train(_overrides(shapes24, tmp_path / "a", "training.max_steps=3", *stage))
    recomputed, _ = _train(
        _overrides(shapes24, tmp_path / "b", "training.max_steps=3", "training.gradient_checkpointing=true", *stage)
    )
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-6)


def test_bf16_autocast_trains_on_cpu(shapes24: Path, tmp_path: Path) -> None:
    result, _ = _train(_overrides(shapes24, tmp_path, "training.max_steps=4", "training.bf16=true"))
    assert result.bad_steps == 0 and all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0]


def test_skipped_bad_records_keep_every_planned_step_and_epoch(shapes24: Path, tmp_path: Path) -> None:
    # Batches of one record, as in local_lite: a bad record empties its whole step. The run must
    # still take the 2 x 6 planned steps, see the bad record once per epoch, and not mistake the
    # end of an epoch for an empty one.
    records = json.loads(shapes24.read_text())[:6]
    records[4]["image"] = "images/missing.png"
    data = tmp_path / "data" / "bad.json"
    shutil.copytree(shapes24.parent, data.parent)
    data.write_text(json.dumps(records))
    settings = _overrides(
        data,
        tmp_path / "run",
        "data.on_error=skip",
        "training.per_device_train_batch_size=1",
        "training.gradient_accumulation_steps=1",
        "training.max_steps=null",
        "training.num_train_epochs=2",
    )
    result, text = _train(settings)
    assert (result.status, result.step, result.total_steps) == ("completed", 12, 12)
    assert len(result.losses) == 10 and all(math.isfinite(x) for x in result.losses)
    assert text.count("every record was skipped as bad; no update") == 2
    assert text.count(f"Skipped bad record(s) {records[4]['id']}") == 2
    assert "Epoch 2/2" in text
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["final_metrics"]["skipped_records"] == 2
