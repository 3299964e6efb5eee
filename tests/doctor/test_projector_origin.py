"""Where the projector starts: doctor warns about random weights after stage 1 and fails a handed-over
projector that does not fit the tower or the LLM, from its shapes alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import profile, run_cli
from safetensors.torch import save_file

from llavactl.doctor import CheckResult, blocking_failures, checks_of
from llavactl.model import projector, weight_files
from llavactl.resolve import resolve
from llavactl.resolve.facts import probe

TINY = 64  # builtin tiny-clip's and tiny-llama's hidden sizes


def rows(*overrides: str) -> dict[str, CheckResult]:
    facts = probe()
    return {r.check: r for r in checks_of(resolve(profile("tiny", *overrides), facts), facts)}


def saved(path: Path, vision: int, text: int, *, kind: str = "mlp2x_gelu") -> Path:
    state = {"model.mm_projector.0.weight": torch.zeros(text, vision), "model.mm_projector.0.bias": torch.zeros(text)}
    if kind == "mlp2x_gelu":
        state["model.mm_projector.2.weight"] = torch.zeros(text, text)
        state["model.mm_projector.2.bias"] = torch.zeros(text)
    else:
        state = {k.replace(".0.", "."): v for k, v in state.items()}
    save_file(state, path)
    return path


@pytest.mark.parametrize("stage", ["lora", "full"])
def test_a_projector_from_random_weights_after_stage_1_is_a_warning_with_the_fix(stage: str) -> None:
    row = rows(f"stage={stage}", "model.projector_from_scratch=false")["projector"]
    assert row.status == "warn" and f"stage {stage} starts the projector from random weights" in row.finding
    assert "LLaVA-1.5 trains it first" in row.finding and "ignore the image" in row.finding
    assert "--profile pretrain" in row.fix and "model.pretrain_mm_mlp_adapter=" in row.fix
    assert "model.projector_from_scratch=true" in row.fix


def test_a_profile_that_means_it_and_stage_1_are_quiet() -> None:
    assert "projector" not in rows()  # tiny says projector_from_scratch: true
    assert "projector" not in rows("stage=projector", "model.projector_from_scratch=false")
    assert profile("local_lite").profile.model.projector_from_scratch is True


def test_a_handed_over_projector_for_another_tower_and_llm_fails_naming_both_sides(tmp_path: Path) -> None:
    file = saved(tmp_path / "mm_projector.safetensors", 1024, 4096)
    row = rows("stage=lora", f"model.pretrain_mm_mlp_adapter={file}")["model.pretrain_mm_mlp_adapter"]
    assert row.status == "fail" and row in blocking_failures([row])
    assert "1024-wide vision features to 4096-wide" in row.finding
    assert "`builtin:tiny-clip` gives 64-wide features (hidden size, read at layer -2)" in row.finding
    assert "`builtin:tiny-llama` takes 64-wide embeddings" in row.finding
    assert "stage-1 run with this profile's tower and LLM" in row.fix


def test_only_the_wrong_side_is_named(tmp_path: Path) -> None:
    file = saved(tmp_path / "p.safetensors", TINY, 4096)
    finding = rows("stage=lora", f"model.pretrain_mm_mlp_adapter={file}")["model.pretrain_mm_mlp_adapter"].finding
    assert "takes 64-wide embeddings" in finding and "tiny-clip" not in finding


def test_a_projector_of_the_other_type_names_the_key_to_set(tmp_path: Path) -> None:
    file = saved(tmp_path / "p.safetensors", TINY, TINY, kind="linear")
    row = rows("stage=lora", f"model.pretrain_mm_mlp_adapter={file}")["model.pretrain_mm_mlp_adapter"]
    assert row.status == "fail" and "`linear` projector" in row.finding and "is `mlp2x_gelu`" in row.finding
    assert row.fix == "add `model.mm_projector_type=linear`"


def test_a_fitting_projector_passes_read_from_its_header_alone(tmp_path: Path, monkeypatch) -> None:
    file = saved(tmp_path / "p.safetensors", TINY, TINY)

    def no_loading(path: Path) -> None:
        raise AssertionError(f"{path} was loaded")

    monkeypatch.setattr(weight_files, "read_state_dict", no_loading)
    described = projector.saved_projector(file)
    assert (described.kind, described.in_features, described.out_features) == ("mlp2x_gelu", TINY, TINY)
    row = rows("stage=lora", f"model.pretrain_mm_mlp_adapter={file}")["model.pretrain_mm_mlp_adapter"]
    assert row.status == "pass" and "64-wide" in row.finding


def test_train_stops_on_a_projector_that_does_not_fit_before_any_weight_loads(tmp_path: Path, monkeypatch) -> None:
    from llavactl.model import assembly

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded")

    # The memory plan builds the model on the meta device, without weights: that may run.
    monkeypatch.setattr(assembly, "_load_parts", no_weights)
    monkeypatch.setattr(assembly, "_random_parts", no_weights)
    file = saved(tmp_path / "p.safetensors", 1024, 4096)
    args = ["train", "-p", "tiny", "stage=lora", f"model.pretrain_mm_mlp_adapter={file}"]
    code, out, err = run_cli([*args, f"training.output_dir={tmp_path / 'run'}"])
    text = " ".join((out + err).split())
    assert code == 1 and "model.pretrain_mm_mlp_adapter" in text and "1024-wide" in text


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("corrupt.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "cannot be read as safetensors"),
        ("garbage.bin", b"not a pickle", "could not be loaded as plain tensors"),
    ],
)
def test_a_damaged_projector_file_fails_naming_it(tmp_path: Path, name: str, content: bytes, said: str) -> None:
    (tmp_path / name).write_bytes(content)
    row = rows("stage=lora", f"model.pretrain_mm_mlp_adapter={tmp_path / name}")["model.pretrain_mm_mlp_adapter"]
    assert row.status == "fail" and said in row.finding and name in row.finding


def test_projector_weights_that_are_not_one_projectors_matrices_fail(tmp_path: Path) -> None:
    save_file(
        {"model.mm_projector.weight": torch.zeros(64), "model.mm_projector.bias": torch.zeros(64)},
        tmp_path / "p.safetensors",
    )
    state = {"model.mm_projector.0.weight": torch.zeros(64, 64), "model.mm_projector.0.bias": torch.zeros(64)}
    state |= {"model.mm_projector.2.weight": torch.zeros(64, 32), "model.mm_projector.2.bias": torch.zeros(64)}
    save_file(state, tmp_path / "q.safetensors")
    for file in ("p.safetensors", "q.safetensors"):
        row = rows("stage=lora", f"model.pretrain_mm_mlp_adapter={tmp_path / file}")["model.pretrain_mm_mlp_adapter"]
        assert row.status == "fail" and "not the matrices of one projector" in row.finding


def test_a_projector_handed_over_to_a_profile_that_starts_from_scratch_is_a_contradiction(tmp_path: Path) -> None:
    file = saved(tmp_path / "p.safetensors", TINY, TINY)
    row = rows("stage=lora", f"model.pretrain_mm_mlp_adapter={file}", "model.projector_from_scratch=true")["projector"]
    assert row.status == "warn" and "hands a projector over" in row.finding and "=null" in row.fix
