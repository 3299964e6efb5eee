"""The memory knobs: one list, read by dry-run's suggestions and by training's out-of-memory error."""

from __future__ import annotations

from pathlib import Path

import llavactl.plan.build as planner
import llavactl.train.out_of_memory as out_of_memory
from llavactl.config import knobs
from llavactl.config.loader import load_profile


def test_dry_run_and_the_out_of_memory_error_read_the_same_list() -> None:
    assert planner.memory_knobs is knobs.memory_knobs
    assert out_of_memory.memory_knobs is knobs.memory_knobs


def test_the_out_of_memory_error_names_the_first_knob_of_each_kind() -> None:
    profile = load_profile("tiny", ["training.per_device_train_batch_size=8", "data.max_seq_len=512"]).profile
    listed = knobs.memory_knobs(profile)
    assert [k.text for k in listed] == [
        "training.per_device_train_batch_size=4 training.gradient_accumulation_steps=2",
        "training.per_device_train_batch_size=2 training.gradient_accumulation_steps=4",
        "training.per_device_train_batch_size=1 training.gradient_accumulation_steps=8",
        "training.gradient_checkpointing=true",
        "stage=lora",
        "data.max_seq_len=256",
    ]
    error = out_of_memory.out_of_memory_error(profile, "the machine ran out of RAM", step=3, output_dir=Path("run"))
    assert error.message == (
        "Step 3: the machine ran out of RAM with micro-batches of 8 records of up to 512 tokens. "
        "Checkpoints already in run are kept."
    )
    assert error.fix == "use less memory per step: " + ", or ".join(
        f"`{k.text}` ({k.why})" for k in [listed[0], *listed[3:]]
    )


def test_under_a_token_budget_the_micro_batches_shrink_by_the_budget() -> None:
    overrides = ["data.padding_free=true", "data.max_tokens_per_batch=2048", "data.max_seq_len=512"]
    profile = load_profile("tiny", overrides).profile
    texts = [k.text for k in knobs.memory_knobs(profile)]
    assert texts[:2] == [
        "data.max_tokens_per_batch=1024 training.gradient_accumulation_steps=2",
        "data.max_tokens_per_batch=512 training.gradient_accumulation_steps=4",
    ]
    assert not any("per_device_train_batch_size" in text for text in texts)


def test_measured_lengths_cut_records_at_their_95th_percentile() -> None:
    profile = load_profile("tiny", ["data.max_seq_len=512"]).profile
    cut = knobs.memory_knobs(profile, p95_tokens=200)[-1]
    assert (cut.text, cut.why) == ("data.max_seq_len=200", "cut records at the 95th percentile of lengths")
