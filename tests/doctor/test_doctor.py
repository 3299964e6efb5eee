"""`llavactl doctor`: every check's pass and fail paths, on machines and folders the tests make up."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import A100, CPU, CPU_BF16, EIGHT_GPUS, GIB, ONE, PACKAGES, T4, profile, run_cli
from safetensors.torch import save_file

from llavactl.data.source import open_source
from llavactl.doctor import blocking_failures, run_checks
from llavactl.doctor.environment import (
    cuda_build_check,
    disk_check,
    package_checks,
    python_check,
    ram_check,
    torch_load_check,
)
from llavactl.doctor.profile_checks import data_checks, model_source_checks, precision_checks, wandb_check
from llavactl.resolve import WorldFacts, resolve
from llavactl.resolve.run import CPU_BF16_EMULATED


def _profile(name: str, *overrides: str):
    return profile(name, *overrides).profile


def _by_check(results, name):
    return [r for r in results if r.check == name]


def test_python_below_310_fails():
    assert python_check(replace(CPU, python=(3, 9, 18))).status == "fail"
    assert python_check(CPU).status == "pass"


def test_package_too_old_fails_and_missing_fails_with_the_install_command():
    results = package_checks(replace(CPU, packages={**PACKAGES, "transformers": "4.46.0", "peft": None}))
    status = {r.check: (r.status, r.fix) for r in results}
    assert status["package transformers"][0] == "fail" and ">=5.24" in status["package transformers"][1]
    assert status["package peft"] == ("fail", "pip install -r requirements_cpu.txt")
    assert status["package torch"][0] == "pass"


def test_old_torch_fails_torch_load_safety_with_both_fixes():
    result = torch_load_check(replace(CPU, packages={**PACKAGES, "torch": "2.5.1"}))
    assert result.status == "fail"
    assert "ValueError" in result.finding
    assert "upgrade torch" in result.fix and "clip-vit-large-patch14-336_safe" in result.fix
    assert torch_load_check(CPU).status == "pass"


def test_cuda_build_without_gpu_warns_and_points_at_requirements_cpu():
    result = cuda_build_check(replace(CPU, torch_cuda_build="12.8"))
    assert result.status == "warn" and "requirements_cpu.txt" in result.fix
    assert cuda_build_check(CPU).status == "pass"
    assert cuda_build_check(A100).status == "pass"


def test_low_ram_warns():
    assert ram_check(replace(CPU, ram_available_bytes=2 * GIB)).status == "warn"
    assert ram_check(CPU).status == "pass"


def test_disk_check_fails_an_output_folder_that_cannot_be_one(tmp_path):
    """A file where the folder (or one of its parents) would be, or a name too long to look at:
    train refuses both, so doctor must not say Ready."""
    (tmp_path / "afile").write_text("x")
    for where in (tmp_path / "afile", tmp_path / "afile" / "run", Path("/dev/null")):
        result = disk_check(str(where))
        assert result.status == "fail" and "cannot be a folder" in result.finding, where
    result = disk_check(str(tmp_path / ("a" * 300)))
    assert result.status == "fail" and "cannot be looked at: File name too long" in result.finding


def test_disk_check_reads_the_nearest_existing_parent(tmp_path):
    result = disk_check(str(tmp_path / "not" / "yet" / "made"))
    assert str(tmp_path) in result.finding


def test_precision_rows_are_the_resolutions_problems_or_what_the_run_computes_in(bf16_measured):
    [slow] = precision_checks(resolve(profile("local_lite", "training.bf16=true"), CPU, ONE))
    assert (slow.check, slow.status, slow.fix) == ("training.bf16", "fail", "add `training.bf16=false`")
    [native] = precision_checks(resolve(profile("local_lite", "training.bf16=true"), CPU_BF16, ONE))
    assert native.status == "pass" and "AVX512-BF16" in native.finding
    [hint] = precision_checks(resolve(profile("local_lite"), CPU_BF16, ONE))
    assert hint.status == "pass" and "training.bf16=true" in hint.fix
    t4 = precision_checks(resolve(profile("finetune"), T4, ONE))
    assert [(r.check, r.status) for r in t4] == [("training.bf16", "fail"), ("training.tf32", "fail")]
    assert [r.status for r in precision_checks(resolve(profile("finetune"), A100, ONE))] == ["pass"]
    # Only CPUs are measured: a GPU's bf16 is its datasheet's.
    assert len(bf16_measured.shapes) == 3


LOCAL_LITE_MATMULS = "this profile's LLM matmuls, 2,048 tokens x 576 -> 1,536"


def test_on_a_cpu_with_native_bf16_fp32_says_how_much_faster_bf16_measured_and_gives_the_override(bf16_measured):
    [row] = precision_checks(resolve(profile("local_lite"), CPU_BF16, ONE))
    assert (row.check, row.status, row.finding) == ("training.bf16", "pass", "fp32")
    assert row.fix == f"bf16 measured 2.4x faster in {LOCAL_LITE_MATMULS}, on AVX512-BF16: `training.bf16=true`"
    # SmolLM-135M's MLP (576 -> 1536) on the most tokens a micro-batch holds: 1 x max_seq_len 2048.
    assert bf16_measured.shapes == [(2048, 576, 1536)]
    [on] = precision_checks(resolve(profile("local_lite", "training.bf16=true"), CPU_BF16, ONE))
    assert on.finding == f"CPU autocast to bf16 on native AVX512-BF16 (2.4x fp32's speed in {LOCAL_LITE_MATMULS})"
    bf16_measured.speedup = 0.8
    [slower] = precision_checks(resolve(profile("local_lite"), CPU_BF16, ONE))
    assert slower.fix == f"bf16 measured 0.8x fp32's speed in {LOCAL_LITE_MATMULS}, on AVX512-BF16: fp32 is faster here"


def test_the_measured_micro_batch_is_the_token_budget_or_the_rows_of_longest_records(bf16_measured):
    precision_checks(resolve(profile("tiny"), CPU_BF16, ONE))
    budget = ["data.padding_free=true", "data.max_tokens_per_batch=4096"]
    precision_checks(resolve(profile("tiny", *budget), CPU_BF16, ONE))
    # tiny: 4 records of at most 384 tokens through tiny-llama's MLP (64 -> 128).
    assert bf16_measured.shapes == [(1536, 64, 128), (4096, 64, 128)]


def test_on_a_cpu_without_native_bf16_doctor_says_bf16_would_be_emulated_with_the_measured_figure(bf16_measured):
    bf16_measured.speedup = 0.19
    [row] = precision_checks(resolve(profile("local_lite"), CPU, ONE))
    assert (row.check, row.status, row.finding) == ("training.bf16", "pass", "fp32")
    assert row.fix == f"{CPU_BF16_EMULATED} (measured: 0.19x fp32's speed in {LOCAL_LITE_MATMULS})"
    [asked] = precision_checks(resolve(profile("local_lite", "training.bf16=true"), CPU, ONE))
    assert asked.status == "fail" and asked.finding.startswith(f"{CPU_BF16_EMULATED}. Set at: training.bf16")
    assert asked.finding.endswith(f"Measured: bf16 runs at 0.19x fp32's speed in {LOCAL_LITE_MATMULS}.")


def test_without_the_llms_config_here_the_precision_row_gives_no_figure(bf16_measured):
    unknown = "model.model_name_or_path=org/not-cached"
    [row] = precision_checks(resolve(profile("local_lite", unknown), CPU_BF16, ONE))
    assert row.fix == "this CPU has native bf16 (AVX512-BF16): `training.bf16=true`"
    [emulated] = precision_checks(resolve(profile("local_lite", unknown), CPU, ONE))
    assert emulated.fix == CPU_BF16_EMULATED and bf16_measured.shapes == []


def test_qlora_on_cpu_fails_in_doctor_with_the_cpu_guides_overrides():
    [row] = _by_check(run_checks(profile("t4_qlora"), CPU, ONE), "QLoRA / bitsandbytes")
    assert row.status == "fail" and row.blocking
    assert "stage=lora model.use_qlora=false model.load_in_4bit=false model.load_in_8bit=false" in row.fix


def test_cuda_profile_on_a_cpu_machine_fails_with_device_override():
    results = run_checks(profile("finetune"), CPU, ONE)
    [device] = _by_check(results, "training.device")
    assert device.status == "fail" and "training.device=cpu" in device.fix
    assert device in blocking_failures(results)


def _records(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_data_check_passes_when_records_parse_and_images_exist(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"png")
    path = _records(
        tmp_path,
        [
            {
                "id": 1,
                "image": "a.png",
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}],
            }
        ],
    )
    data = _profile("local_lite", f"data.data_path={path}", f"data.image_folder={tmp_path / 'img'}").data
    [result] = data_checks(data, lambda: open_source(data, 0))
    assert result.status == "pass" and "1 records" in result.finding


def test_data_check_fails_on_missing_file_folder_and_image(tmp_path):
    data = _profile("local_lite").data.model_copy(update={"data_path": str(tmp_path / "nope.json")})
    assert data_checks(data, lambda: open_source(data, 0))[0].status == "fail"
    path = _records(
        tmp_path,
        [
            {
                "id": 1,
                "image": "gone.png",
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}],
            }
        ],
    )
    data = data.model_copy(update={"data_path": str(path), "image_folder": str(tmp_path)})
    [result] = data_checks(data, lambda: open_source(data, 0))
    assert result.check == "data images" and result.status == "fail" and "gone.png" in result.finding
    data = data.model_copy(update={"image_folder": str(tmp_path / "missing")})
    [result] = data_checks(data, lambda: open_source(data, 0))
    assert result.status == "fail" and "data.image_folder" in result.finding


def test_data_check_fails_on_bad_records(tmp_path):
    path = _records(tmp_path, [{"id": 1, "conversations": [{"from": "robot", "value": "hi"}]}])
    data = _profile("local_lite").data.model_copy(update={"data_path": str(path), "image_folder": None})
    [result] = data_checks(data, lambda: open_source(data, 0))
    assert result.status == "fail" and "bad_role" in result.finding


def test_with_on_error_skip_a_few_bad_records_warn_and_all_bad_still_fail(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
    good = {"id": 1, "image": "a.png", "conversations": turns}
    gone = {"id": 2, "image": "gone.png", "conversations": turns}
    robot = {"id": 3, "conversations": [{"from": "robot", "value": "hi"}]}
    data = _profile("local_lite", "data.on_error=skip").data.model_copy(update={"image_folder": str(tmp_path)})

    def check(records: list[dict]) -> object:
        one = data.model_copy(update={"data_path": str(_records(tmp_path, records))})
        [result] = data_checks(one, lambda: open_source(one, 0))
        return result

    images, records = check([good, gone]), check([good, robot])
    assert (images.check, images.status) == ("data images", "warn") and "will skip their records" in images.finding
    assert (records.check, records.status) == ("data records", "warn") and "bad_role" in records.finding
    assert check([gone]).status == "fail" and check([robot]).status == "fail"


def _tower_folder(root: Path, name: str, *, pickle: bool) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    tensors = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4)}
    if pickle:
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file(tensors, folder / "pytorch_model.safetensors")
    return folder


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _source(model_cfg, facts=CPU, offline=False):
    loaded = profile("local_lite")
    loaded.profile.model = model_cfg
    return {r.check: r for r in model_source_checks(resolve(loaded, facts, ONE), offline=offline)}


def test_safetensors_only_tower_passes_pickle_only_warns_or_fails_by_torch(tmp_path, empty_hub_cache):
    model = _profile("local_lite").model
    safe = _tower_folder(tmp_path, "safe", pickle=False)
    assert _source(model.model_copy(update={"vision_tower": str(safe)}))["model.vision_tower"].status == "pass"
    pickled = _tower_folder(tmp_path, "pickled", pickle=True)
    cfg = model.model_copy(update={"vision_tower": str(pickled)})
    assert _source(cfg)["model.vision_tower"].status == "warn"
    old = replace(CPU, packages={**PACKAGES, "torch": "2.4.0"})
    result = _source(cfg, old)["model.vision_tower"]
    assert result.status == "fail" and "torch.load" in result.finding


def test_absent_model_warns_online_and_fails_offline_with_hf_download(empty_hub_cache):
    model = _profile("local_lite").model
    online = _source(model)["model.model_name_or_path"]
    assert online.status == "warn" and "hf download HuggingFaceTB/SmolLM-135M" in online.fix
    offline = _source(model, offline=True)["model.vision_tower"]
    assert offline.status == "fail" and str(empty_hub_cache) in offline.finding
    assert "hf download jeromeku/clip-vit-large-patch14-336_safe" in offline.fix


def test_model_found_in_the_hub_cache_layout(empty_hub_cache):
    snapshot = empty_hub_cache / "models--org--tower" / "snapshots" / "abc123"
    _tower_folder(snapshot.parent, "abc123", pickle=False)
    (empty_hub_cache / "models--org--tower" / "refs").mkdir()
    (empty_hub_cache / "models--org--tower" / "refs" / "main").write_text("abc123")
    model = _profile("local_lite").model.model_copy(update={"vision_tower": "org/tower"})
    assert _source(model, offline=True)["model.vision_tower"].status == "pass"


def test_folder_without_weights_fails(tmp_path, empty_hub_cache):
    (tmp_path / "empty").mkdir()
    model = _profile("local_lite").model.model_copy(update={"vision_tower": str(tmp_path / "empty")})
    assert _source(model)["model.vision_tower"].status == "fail"


def test_missing_stage_one_projector_fails(empty_hub_cache):
    result = _source(_profile("finetune").model)["model.pretrain_mm_mlp_adapter"]
    assert result.status == "fail" and "pretrain" in result.fix


def test_wandb_checks(monkeypatch, tmp_path):
    training = _profile("local_lite", "training.report_to=wandb").training
    assert wandb_check(training, CPU).status == "warn"
    with_wandb = replace(CPU, packages={**PACKAGES, "wandb": "0.19.0"})
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_check(training, with_wandb).fix.startswith("`wandb login`")
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert wandb_check(training, with_wandb).status == "pass"
    assert wandb_check(_profile("local_lite").training, CPU) is None


def test_cli_doctor_json_for_tiny_is_ok_and_exit_0():
    code, out, _ = run_cli(["doctor", "--profile", "tiny", "--json"])
    data = json.loads(out)
    assert code == (0 if data["ok"] else 1)
    assert {c["check"] for c in data["checks"]} >= {"python", "device", "model.vision_tower", "data"}
    assert all(set(c) == {"check", "status", "finding", "fix", "blocking"} for c in data["checks"])


@pytest.mark.slow
def test_cli_doctor_exits_1_on_a_failing_check(tmp_path):
    code, out, err = run_cli(["doctor", "--profile", "local_lite", f"data.data_path={tmp_path}/x.json"])
    assert code == 1
    assert "data.data_path" in out and "Error:" in err and "check" in err and "failed" in err


def test_memory_check_passes_warns_within_the_error_and_fails_with_the_overrides_that_fit():
    from llavactl.doctor.memory_checks import memory_check

    resolved = resolve(profile("local_lite"), CPU, ONE)
    free = CPU.ram_available_bytes
    assert memory_check(resolved, lambda r: (free // 2, None)).status == "pass"
    assert memory_check(resolved, lambda r: (int(free * 0.9), None)).status == "warn"
    fix = "training.per_device_train_batch_size=1 training.gradient_accumulation_steps=16"
    result = memory_check(resolved, lambda r: (free * 2, fix))
    assert result.status == "fail" and result.fix == f"add `{fix}`"
    assert "no override fits" in memory_check(resolved, lambda r: (free * 2, None)).fix


def test_memory_check_on_a_gpu_compares_with_its_free_memory_and_skips_without_one():
    from llavactl.doctor.memory_checks import memory_check

    seen = []
    on_t4 = resolve(profile("t4_qlora"), T4, ONE)
    result = memory_check(on_t4, lambda r: (seen.append(r.free_memory_bytes) or 10 * GIB, None))
    assert result.status == "pass" and seen == [15 * GIB] and "Tesla T4" in result.finding
    assert memory_check(resolve(profile("t4_qlora"), CPU, ONE), lambda r: (0, None)).status == "skipped"


def test_memory_check_with_the_real_planner_on_tiny():
    from llavactl.plan import plan_memory

    results = run_checks(profile("tiny"), CPU, ONE, memory_planner=plan_memory)
    [memory] = _by_check(results, "memory")
    assert memory.status == "pass" and "estimated peak" in memory.finding


def test_doctor_reads_the_world_torchrun_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    results = {r.check: r for r in run_checks(profile("tiny"), CPU, offline=True)}
    assert results["world"].finding == "2 processes (2 on this node), ddp"
    assert results["distributed backend"].status == "pass"
    assert results["global batch"].finding.startswith("8 = 4 per device x 1 accumulation x 2 processes")


# What torchrun's agents tell the workers of two nodes of one process each, allowed 3 restarts.
TWO_NODES_RESTARTING = {
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "1",
    "GROUP_WORLD_SIZE": "2",
    "TORCHELASTIC_MAX_RESTARTS": "3",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
}


def test_restarts_of_several_nodes_sharing_the_agents_store_are_warned_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in TWO_NODES_RESTARTING.items():
        monkeypatch.setenv(key, value)
    [world] = _by_check(run_checks(profile("tiny"), CPU, offline=True), "world")
    assert world.status == "warn"
    assert world.finding == (
        "2 processes (1 on this node), ddp; torchrun may restart this run of 2 nodes (--max-restarts 3) and keeps "
        "one store for all restarts: a restarted group can hang in init_process_group, reading the addresses of the "
        "processes it replaces (pytorch/pytorch#135712)."
    )
    assert world.fix.startswith("`export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` before torchrun on every node")


@pytest.mark.parametrize(
    "instead",
    [
        {"GROUP_WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "2"},  # one node: llavactl scopes the keys itself
        {"TORCHELASTIC_MAX_RESTARTS": "0"},
        {"TORCHELASTIC_USE_AGENT_STORE": "False"},  # what TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 makes it
    ],
)
def test_restarts_on_one_node_none_or_a_store_of_each_restart_pass(
    monkeypatch: pytest.MonkeyPatch, instead: dict[str, str]
) -> None:
    for key, value in {**TWO_NODES_RESTARTING, **instead}.items():
        monkeypatch.setenv(key, value)
    [world] = _by_check(run_checks(profile("tiny"), CPU, offline=True), "world")
    assert world.status == "pass" and "#135712" not in world.finding


def test_global_batch_is_shown_and_a_multiplied_one_gets_the_accumulation_that_keeps_it() -> None:
    from llavactl.doctor.distributed_checks import global_batch_check

    eight = WorldFacts(8, 8, frozenset({"gloo", "nccl"}))

    def check(name: str, *overrides: str, world: WorldFacts = eight):
        return global_batch_check(resolve(profile(name, *overrides), EIGHT_GPUS, world))

    assert check("finetune", world=ONE).finding == "128 = 16 per device x 8 accumulation x 1 process"
    multiplied = check("finetune")
    assert multiplied.status == "warn"
    assert multiplied.finding.startswith("1024 = 16 per device x 8 accumulation x 8 processes: 8 times the")
    assert multiplied.fix.startswith("add `training.gradient_accumulation_steps=1` to keep")
    assert check("finetune", "training.gradient_accumulation_steps=1").status == "warn"
    tiny = check("tiny", world=WorldFacts(2, 2, frozenset({"gloo"})))
    assert "`training.per_device_train_batch_size=2 training.gradient_accumulation_steps=1`" in (tiny.fix or "")


@pytest.mark.parametrize(
    ("world", "status"), [(WorldFacts(1, 1, frozenset()), "warn"), (WorldFacts(2, 2, frozenset()), "fail")]
)
def test_missing_backend_blocks_only_a_multi_process_run(world: WorldFacts, status: str) -> None:
    [result] = _by_check(run_checks(profile("tiny"), CPU, world), "distributed backend")
    assert result.status == status and "no `gloo` backend" in result.finding


def test_one_process_and_several_name_a_missing_backend_and_its_fix_alike() -> None:
    [one] = _by_check(run_checks(profile("tiny"), CPU, WorldFacts(1, 1, frozenset())), "distributed backend")
    [two] = _by_check(run_checks(profile("tiny"), CPU, WorldFacts(2, 2, frozenset())), "distributed backend")
    needs = "this torch build has no `gloo` backend, which multi-process training on cpu needs."
    assert needs in one.finding and needs in two.finding and one.fix == two.fix
    assert one.finding.endswith("One process trains without it.")


def test_doctor_reads_the_plans_fits_rule_at_its_margin() -> None:
    from llavactl.doctor.memory_checks import memory_check
    from llavactl.resolve.run import memory_fit

    resolved = resolve(profile("local_lite"), CPU, ONE)
    free = CPU.ram_available_bytes
    for peak in (int(free * 0.8), int(free * 0.8) + 1, free, free + 1):
        status = memory_check(resolved, lambda r, peak=peak: (peak, None)).status
        assert status == {"fits": "pass", "tight": "warn", "over": "fail"}[memory_fit(peak, free)]
    assert [memory_fit(p, 100) for p in (80, 81, 100, 101)] == ["fits", "tight", "tight", "over"]
    assert memory_fit(1, None) is None
