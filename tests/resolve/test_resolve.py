"""Profile x machine, once: the device `auto` means, precision, QLoRA, the world, free memory, and the
problems of each machine rule reported with the key, where it was set and the fix."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import A100, CPU, CPU_BF16, EIGHT_GPUS, GIB, H100, MPS, ONE, PACKAGES, T4, profile

from llavactl.errors import ConfigError
from llavactl.resolve import WorldFacts, resolve
from llavactl.resolve.facts import probe, probe_world

EIGHT = WorldFacts(8, 8, frozenset({"gloo", "nccl"}))


def problems(resolved) -> dict[str, object]:
    return {p.check: p for p in resolved.problems}


def test_auto_means_cuda_then_mps_then_cpu():
    auto = profile("tiny", "training.device=auto")
    assert resolve(auto, CPU, ONE).device_type == "cpu"
    assert resolve(auto, MPS, ONE).device_type == "mps"
    assert resolve(auto, A100, ONE).device_type == "cuda"
    assert resolve(profile("tiny"), CPU, ONE).problems == ()


def test_a_cuda_profile_on_a_cpu_machine_names_the_key_where_it_was_set_and_the_fix():
    resolved = resolve(profile("finetune"), CPU, ONE)
    device = problems(resolved)["training.device"]
    assert device.stops_run
    assert "no usable NVIDIA GPU (torch is a CPU build)" in device.problem.message
    assert "training.device=cpu" in device.problem.fix
    with pytest.raises(ConfigError) as caught:
        resolved.raise_problems()
    assert "has 1 problem on this machine (cuda)" in caught.value.message
    assert "training.device: the profile trains on CUDA" in caught.value.message


def test_a_cuda_build_without_a_gpu_says_so():
    resolved = resolve(profile("finetune"), replace(CPU, torch_cuda_build="12.8"), ONE)
    assert "CUDA 12.8 build but sees no GPU" in problems(resolved)["training.device"].problem.message


def test_mps_requested_on_a_machine_without_it_fails():
    resolved = resolve(profile("tiny", "training.device=mps"), CPU, ONE)
    message = problems(resolved)["training.device"].problem.message
    assert "MPS, which this machine lacks" in message and "override `training.device=mps`" in message


def test_bf16_on_a_cpu_without_native_bf16_is_a_problem_that_does_not_stop_a_run():
    slow = problems(resolve(profile("local_lite", "training.bf16=true"), CPU, ONE))["training.bf16"]
    assert not slow.stops_run and slow.problem.fix == "add `training.bf16=false`"
    fast = resolve(profile("local_lite", "training.bf16=true"), CPU_BF16, ONE)
    assert fast.problems == () and fast.precision.autocast == "bf16" and not fast.precision.grad_scaler


def test_bf16_on_a_t4_and_tf32_off_ampere_are_problems_with_their_fixes():
    t4 = problems(resolve(profile("finetune"), T4, ONE))
    assert t4["training.bf16"].problem.fix == "add `training.bf16=false training.fp16=true`"
    assert "Tesla T4 has no TF32" in t4["training.tf32"].problem.message
    a100 = resolve(profile("finetune"), A100, ONE)
    assert a100.problems == () and a100.precision.tf32 and a100.precision.autocast == "bf16"


def test_fp16_needs_cuda_wherever_the_device_comes_from():
    on_cpu = problems(resolve(profile("t4_qlora", "training.device=auto"), CPU, ONE))["training.fp16"]
    assert on_cpu.stops_run and "needs CUDA, but the device is `cpu`" in on_cpu.problem.message
    explicit = resolve(profile("tiny", "training.fp16=true", "training.device=cpu"), CPU, ONE)
    assert "override `training.fp16=true`" in problems(explicit)["training.fp16"].problem.message
    scaled = resolve(profile("t4_qlora"), T4, ONE).precision
    assert scaled.autocast == "fp16" and scaled.grad_scaler


def test_qlora_on_a_cpu_gives_the_cpu_guides_overrides_once():
    qlora = problems(resolve(profile("t4_qlora"), CPU, ONE))["QLoRA / bitsandbytes"]
    assert qlora.stops_run
    assert "stage=lora model.use_qlora=false model.load_in_4bit=false model.load_in_8bit=false" in qlora.problem.fix


def test_qlora_without_bitsandbytes_or_with_a_broken_one_fails_and_with_it_passes():
    missing = resolve(profile("t4_qlora"), replace(T4, packages={**PACKAGES, "bitsandbytes": None}), ONE)
    assert "llavactl[qlora]" in problems(missing)["QLoRA / bitsandbytes"].problem.fix
    broken = resolve(profile("t4_qlora"), replace(T4, bitsandbytes_error="RuntimeError: CUDA Setup failed"), ONE)
    assert "CUDA Setup failed" in problems(broken)["QLoRA / bitsandbytes"].problem.message
    assert "QLoRA / bitsandbytes" not in problems(resolve(profile("t4_qlora"), T4, ONE))


def test_free_memory_is_the_devices():
    assert resolve(profile("tiny"), CPU, ONE).free_memory_bytes == 20 * GIB
    gpu = resolve(profile("t4_qlora"), T4, ONE)
    assert (gpu.free_memory_bytes, gpu.memory_where) == (15 * GIB, "free memory of Tesla T4")
    absent = resolve(profile("finetune"), CPU, ONE)
    assert absent.free_memory_bytes is None and not absent.device_present


def test_one_process_per_gpu():
    four = replace(EIGHT_GPUS, gpus=[H100] * 4)
    world = problems(resolve(profile("finetune"), four, EIGHT))["world"]
    assert world.problem.message.startswith("8 processes on this node but 4 CUDA devices: one process per GPU.")
    assert world.problem.fix == "start `--nproc-per-node 4`"


def test_fsdp_limits_hold_only_for_several_processes():
    lora = profile("finetune_lora", "training.distributed=fsdp")
    assert "add `training.distributed=ddp`" in problems(resolve(lora, EIGHT_GPUS, EIGHT))["world"].problem.fix
    assert resolve(lora, EIGHT_GPUS, ONE).problems == ()
    full = resolve(profile("finetune", "training.distributed=fsdp"), EIGHT_GPUS, EIGHT)
    assert full.problems == () and full.world.sharded and full.world.backend == "nccl"
    fp16 = resolve(
        profile("finetune", "training.distributed=fsdp", "training.bf16=false", "training.fp16=true"), EIGHT_GPUS, EIGHT
    )
    assert "not fp16" in problems(fp16)["world"].problem.message


def test_a_missing_backend_stops_a_multi_process_run():
    no_gloo = resolve(profile("tiny"), CPU, WorldFacts(2, 2, frozenset()))
    assert "no `gloo` backend" in problems(no_gloo)["distributed backend"].problem.message
    assert resolve(profile("tiny"), CPU, WorldFacts(1, 1, frozenset())).problems == ()


def test_the_world_of_a_torchrun_rank(monkeypatch: pytest.MonkeyPatch):
    for key, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    world = resolve(profile("finetune"), replace(EIGHT_GPUS, gpus=[H100] * 2), probe_world()).world
    assert (world.size, world.rank, world.local_rank, world.backend, world.strategy) == (2, 1, 1, "nccl", "ddp")
    cuda = resolve(profile("finetune"), replace(EIGHT_GPUS, gpus=[H100] * 2), probe_world())
    assert cuda.device == "cuda:1"


def test_model_sources_are_resolved_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    sources = {s.key: s for s in resolve(profile("local_lite"), CPU, ONE).sources}
    assert sources["model.vision_tower"].kind == "missing"
    assert {s.kind for s in resolve(profile("tiny"), CPU, ONE).sources} == {"builtin"}


def test_probe_reads_this_machine():
    import torch

    facts = probe()
    assert facts.packages["torch"] == torch.__version__
    assert facts.cpu_cores >= 1 and facts.ram_total_bytes > 0
    assert probe_world().size == 1
