"""Saving and loading what a stage trains: exact round trips, peft's adapter layout, strictness."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_config as tiny
from safetensors.torch import load_file, save_file

from llavactl.errors import ModelSourceError
from llavactl.model.assembly import AssembledModel, build_llava
from llavactl.model.weights import load_trainable, save_trainable


def trained(assembled: AssembledModel) -> AssembledModel:
    """Move every trainable tensor away from its seeded init, as training would."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for group in assembled.parameter_groups().values():
            for _, parameter in group:
                parameter.add_(torch.randn(parameter.shape, generator=generator))
    return assembled


def trainable_tensors(assembled: AssembledModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for g in assembled.parameter_groups().values() for n, p in g}


CASES = [
    ("projector", {}, {"projector.safetensors"}),
    ("lora", {}, {"projector.safetensors", "adapter_model.safetensors", "adapter_config.json"}),
    ("full", {}, {"projector.safetensors", "trainable.safetensors"}),
    ("lora", {"freeze_vision_tower": False}, {"projector.safetensors", "adapter_model.safetensors",
                                              "adapter_config.json", "trainable.safetensors"}),
]  # fmt: skip


@pytest.mark.parametrize(("stage", "fields", "files"), CASES)
def test_trainable_weights_round_trip_exactly(tmp_path, stage, fields, files):
    source = trained(build_llava(tiny(**fields), stage, image_size=None, seed=0))
    written = save_trainable(source, tmp_path)
    assert {p.name for p in written} == files == {p.name for p in tmp_path.iterdir()}
    fresh = build_llava(tiny(**fields), stage, image_size=None, seed=0)
    before = trainable_tensors(fresh)
    load_trainable(fresh, tmp_path)
    expected, loaded = trainable_tensors(source), trainable_tensors(fresh)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not any(torch.equal(before[k], expected[k]) for k in expected)


def test_lora_adapters_are_saved_in_peft_layout_and_load_with_peft(tmp_path):
    from peft import PeftModel

    source = trained(build_llava(tiny(), "lora", image_size=None, seed=0))
    save_trainable(source, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 16

    base = build_llava(tiny(), "projector", image_size=None, seed=0).model
    peft_model = PeftModel.from_pretrained(base, tmp_path)
    name = "model.language_model.layers.1.self_attn.v_proj.lora_B.default.weight"
    assert torch.equal(peft_model.base_model.model.get_parameter(name), source.model.get_parameter(name))


def test_projector_file_uses_llava_hf_names(tmp_path):
    save_trainable(trained(build_llava(tiny(), "projector", image_size=None, seed=0)), tmp_path)
    assert set(load_file(tmp_path / "projector.safetensors")) == {
        f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
    }


def test_a_checkpoint_of_another_stage_is_refused(tmp_path):
    save_trainable(build_llava(tiny(), "projector", image_size=None, seed=0), tmp_path / "projector")
    save_trainable(build_llava(tiny(), "full", image_size=None, seed=0), tmp_path / "full")
    with pytest.raises(ModelSourceError, match=r"has no `adapter_model\.safetensors`"):
        load_trainable(build_llava(tiny(), "lora", image_size=None, seed=0), tmp_path / "projector")
    with pytest.raises(ModelSourceError, match=r"trainable\.safetensors, which stage `projector` does not train"):
        load_trainable(build_llava(tiny(), "projector", image_size=None, seed=0), tmp_path / "full")


def test_an_unexpected_or_missing_key_is_an_error(tmp_path):
    assembled = build_llava(tiny(), "projector", image_size=None, seed=0)
    save_trainable(assembled, tmp_path)
    path = tmp_path / "projector.safetensors"
    tensors = load_file(path)
    save_file({**tensors, "model.multi_modal_projector.linear_3.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelSourceError, match=r"unexpected model\.multi_modal_projector\.linear_3\.weight"):
        load_trainable(assembled, tmp_path)
    del tensors["model.multi_modal_projector.linear_2.bias"]
    save_file(tensors, path)
    with pytest.raises(ModelSourceError, match=r"missing model\.multi_modal_projector\.linear_2\.bias"):
        load_trainable(assembled, tmp_path)
