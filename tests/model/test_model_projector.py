"""Loading a stage-1 projector by key mapping: LLaVA and llava-hf names, strictly."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config as tiny
from safetensors.torch import save_file

from llavactl.config.schema import ModelConfig
from llavactl.errors import ModelSourceError
from llavactl.model.assembly import build_llava
from llavactl.model.weights import save_trainable

VISION, TEXT = 64, 64  # builtin tiny-clip and tiny-llama hidden sizes


def mlp_weights(prefix_1: str, prefix_2: str) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    values = [torch.randn(TEXT, VISION), torch.randn(TEXT), torch.randn(TEXT, TEXT), torch.randn(TEXT)]
    names = [f"{prefix_1}.weight", f"{prefix_1}.bias", f"{prefix_2}.weight", f"{prefix_2}.bias"]
    return dict(zip(names, values, strict=True)), values


def projector_values(cfg: ModelConfig) -> list[torch.Tensor]:
    projector = build_llava(cfg, "projector", image_size=None, seed=0).model.model.multi_modal_projector
    return [projector.linear_1.weight, projector.linear_1.bias, projector.linear_2.weight, projector.linear_2.bias]


@pytest.mark.parametrize(
    ("prefix_1", "prefix_2"),
    [
        ("model.mm_projector.0", "model.mm_projector.2"),  # LLaVA's mm_projector.bin
        ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2"),  # llava-hf, transformers 4
        ("model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"),  # transformers 5
    ],
)
def test_mlp_projector_loads_from_each_naming_scheme(tmp_path, prefix_1, prefix_2):
    state, values = mlp_weights(prefix_1, prefix_2)
    save_file(state, tmp_path / "mm_projector.safetensors")
    loaded = projector_values(tiny(pretrain_mm_mlp_adapter=str(tmp_path / "mm_projector.safetensors")))
    assert all(torch.equal(a, b) for a, b in zip(loaded, values, strict=True))


def test_llava_pickle_projector_and_linear_type_load(tmp_path):
    weight, bias = torch.randn(TEXT, VISION), torch.randn(TEXT)
    torch.save({"model.mm_projector.weight": weight, "model.mm_projector.bias": bias}, tmp_path / "mm_projector.bin")
    cfg = tiny(mm_projector_type="linear", pretrain_mm_mlp_adapter=str(tmp_path))  # a LLaVA run folder
    linear_1_weight, linear_1_bias, linear_2_weight, _ = projector_values(cfg)
    assert torch.equal(linear_1_weight, weight)
    assert torch.equal(linear_1_bias, bias)
    assert torch.equal(linear_2_weight, torch.eye(TEXT))


def test_a_llavactl_checkpoint_folder_gives_its_projector(tmp_path):
    source = build_llava(tiny(), "lora", image_size=None, seed=5)
    save_trainable(source, tmp_path)
    loaded = projector_values(tiny(pretrain_mm_mlp_adapter=str(tmp_path)))
    assert torch.equal(loaded[0], source.model.model.multi_modal_projector.linear_1.weight)


def test_a_key_that_maps_to_nothing_is_an_error(tmp_path):
    state, _ = mlp_weights("model.mm_projector.0", "model.mm_projector.2")
    state["model.embed_tokens.weight"] = torch.zeros(3, TEXT)
    save_file(state, tmp_path / "p.safetensors")
    with pytest.raises(ModelSourceError, match=r"not projector weights .*model\.embed_tokens\.weight"):
        projector_values(tiny(pretrain_mm_mlp_adapter=str(tmp_path / "p.safetensors")))


def test_a_missing_key_is_an_error(tmp_path):
    state, _ = mlp_weights("model.mm_projector.0", "model.mm_projector.2")
    del state["model.mm_projector.2.bias"]
    save_file(state, tmp_path / "p.safetensors")
    with pytest.raises(ModelSourceError, match=r"missing: \['linear_2\.bias'\]"):
        projector_values(tiny(pretrain_mm_mlp_adapter=str(tmp_path / "p.safetensors")))


def test_mixed_schemes_naming_one_weight_twice_are_an_error(tmp_path):
    state, _ = mlp_weights("model.mm_projector.0", "model.mm_projector.2")
    state["multi_modal_projector.linear_1.weight"] = torch.zeros(TEXT, VISION)
    save_file(state, tmp_path / "p.safetensors")
    with pytest.raises(ModelSourceError, match=r"two tensors for the projector's `linear_1\.weight`"):
        projector_values(tiny(pretrain_mm_mlp_adapter=str(tmp_path / "p.safetensors")))


def test_a_projector_of_the_other_type_names_the_override(tmp_path):
    state, _ = mlp_weights("model.mm_projector.0", "model.mm_projector.2")
    save_file(state, tmp_path / "p.safetensors")
    with pytest.raises(ModelSourceError) as caught:
        projector_values(tiny(mm_projector_type="linear", pretrain_mm_mlp_adapter=str(tmp_path / "p.safetensors")))
    assert caught.value.fix == "add `model.mm_projector_type=mlp2x_gelu`"


def test_a_projector_for_other_hidden_sizes_is_an_error(tmp_path):
    state, _ = mlp_weights("model.mm_projector.0", "model.mm_projector.2")
    state["model.mm_projector.0.weight"] = torch.zeros(TEXT, 1024)  # trained on a CLIP-L tower
    save_file(state, tmp_path / "p.safetensors")
    with pytest.raises(ModelSourceError, match=r"shape \(64, 1024\), the model needs \(64, 64\)"):
        projector_values(tiny(pretrain_mm_mlp_adapter=str(tmp_path / "p.safetensors")))
