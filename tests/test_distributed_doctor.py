"""doctor knows the world: process count against the GPUs, the backend, the global batch against the profile's."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llavactl.config.loader import load_profile
from llavactl.doctor import run_checks
from llavactl.doctor.distributed_checks import (
    WorldFacts,
    backend_check,
    distributed_checks,
    global_batch_check,
    world_check,
)
from llavactl.doctor.facts import GpuFacts, MachineFacts

GIB = 1024**3
CPU = MachineFacts(python=(3, 11, 7), packages={"torch": "2.13.0"}, torch_cuda_build=None, cpu_cores=2)
H100 = GpuFacts("NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, (9, 0))
FOUR_GPUS = replace(CPU, torch_cuda_build="12.8", gpus=[H100] * 4)
ONE = WorldFacts(1, 1, frozenset({"gloo", "nccl"}))
EIGHT = WorldFacts(8, 8, frozenset({"gloo", "nccl"}))


def _profile(name: str, *overrides: str):
    return load_profile(name, list(overrides)).profile


def test_one_process_passes_and_points_at_nproc_per_node() -> None:
    result = world_check(_profile("tiny"), CPU, ONE)
    assert (result.status, result.finding) == ("pass", "1 process")
    assert "--nproc-per-node N" in (result.fix or "")


def test_more_processes_on_a_node_than_gpus_fail_with_the_right_count() -> None:
    result = world_check(_profile("finetune"), FOUR_GPUS, EIGHT)
    assert result.status == "fail" and result.blocking
    assert result.finding == "8 processes on this node but 4 CUDA devices: one process per GPU."
    assert result.fix == "start `--nproc-per-node 4`"


def test_fsdp_on_a_lora_stage_fails_only_when_there_are_several_processes() -> None:
    lora = _profile("finetune_lora", "training.distributed=fsdp")
    eight_gpus = replace(FOUR_GPUS, gpus=[H100] * 8)
    assert world_check(lora, eight_gpus, EIGHT).status == "fail"
    assert "training.distributed=ddp" in (world_check(lora, eight_gpus, EIGHT).fix or "")
    assert world_check(lora, eight_gpus, ONE).status == "pass"
    full = world_check(_profile("finetune", "training.distributed=fsdp"), eight_gpus, EIGHT)
    assert (full.status, full.finding) == ("pass", "8 processes (8 on this node), fsdp")


@pytest.mark.parametrize(
    ("world", "status"), [(WorldFacts(1, 1, frozenset()), "warn"), (WorldFacts(2, 2, frozenset()), "fail")]
)
def test_missing_backend_blocks_only_a_multi_process_run(world: WorldFacts, status: str) -> None:
    result = backend_check(_profile("tiny"), CPU, world)
    assert result.status == status
    assert "no `gloo` backend" in result.finding
    assert backend_check(_profile("finetune"), FOUR_GPUS, EIGHT).finding == "nccl (cuda)"


def test_global_batch_is_shown_and_a_multiplied_one_gets_the_accumulation_that_keeps_it() -> None:
    finetune = _profile("finetune")  # 16 per device x 8 accumulation = 128, as LLaVA-1.5
    assert global_batch_check(finetune, ONE).finding == "128 = 16 per device x 8 accumulation x 1 process"
    eight = global_batch_check(finetune, EIGHT)
    assert eight.status == "warn"
    assert eight.finding.startswith("1024 = 16 per device x 8 accumulation x 8 processes: 8 times the profile's 128")
    assert eight.fix is not None and eight.fix.startswith("add `training.gradient_accumulation_steps=1` to keep")
    kept = global_batch_check(_profile("finetune", "training.gradient_accumulation_steps=1"), EIGHT)
    assert kept.status == "warn"  # 16 x 1 x 8 = 128, but the profile now says 16
    tiny = global_batch_check(_profile("tiny"), WorldFacts(2, 2, frozenset({"gloo"})))
    assert "`training.per_device_train_batch_size=2 training.gradient_accumulation_steps=1`" in (tiny.fix or "")


def test_doctor_reads_the_world_torchrun_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    results = {r.check: r for r in run_checks(_profile("tiny"), CPU, offline=True)}
    assert results["world"].finding == "2 processes (2 on this node), ddp"
    assert results["distributed backend"].status == "pass"
    assert results["global batch"].finding.startswith("8 = 4 per device x 1 accumulation x 2 processes")
    assert [r.check for r in distributed_checks(_profile("tiny"), CPU, ONE)] == [
        "world",
        "distributed backend",
        "global batch",
    ]
