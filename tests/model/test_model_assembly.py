"""LLaVA assembly: what each stage trains, the forward pass on a collator-shaped batch, the frozen
tower under gradient checkpointing, and meta-device builds of the known real configs."""

from __future__ import annotations

import pytest
import torch
from helpers import collated
from helpers import tiny_config as tiny

from llavactl.config.schema import ModelConfig
from llavactl.errors import ConfigError
from llavactl.model import builtin
from llavactl.model.assembly import AssembledModel, build_llava

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def trainable_names(assembled: AssembledModel) -> set[str]:
    return {name for group in assembled.parameter_groups().values() for name, _ in group}


def names_under(assembled: AssembledModel, prefix: str) -> set[str]:
    return {name for name, _ in assembled.model.named_parameters() if name.startswith(prefix)}


PROJECTOR = {f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}


def test_projector_stage_trains_the_projector_only():
    assembled = build_llava(tiny(), "projector", image_size=None, seed=0)
    assert set(assembled.parameter_groups()) == {"projector"}
    assert trainable_names(assembled) == PROJECTOR


def test_lora_stage_trains_adapters_on_llm_targets_and_the_projector():
    assembled = build_llava(tiny(), "lora", image_size=None, seed=0)
    groups = assembled.parameter_groups()
    assert set(groups) == {"lora", "projector"}
    assert {name for name, _ in groups["projector"]} == PROJECTOR
    expected = {
        f"model.language_model.layers.{layer}.self_attn.{module}.lora_{ab}.default.weight"
        for layer in range(builtin.LLMS["tiny-llama"]["num_hidden_layers"])
        for module in TARGETS
        for ab in ("A", "B")
    }
    assert {name for name, _ in groups["lora"]} == expected
    assert all(p.shape[0] == 16 or p.shape[1] == 16 for _, p in groups["lora"])  # lora_r


def test_full_stage_trains_the_whole_llm_and_the_projector():
    assembled = build_llava(tiny(), "full", image_size=None, seed=0)
    groups = assembled.parameter_groups()
    assert set(groups) == {"llm", "projector"}
    # lm_head is tied to the embeddings (as in SmolLM), so it is the same parameter.
    assert assembled.model.lm_head.weight is assembled.model.model.language_model.embed_tokens.weight
    assert {name for name, _ in groups["llm"]} == names_under(assembled, "model.language_model.")


@pytest.mark.parametrize("stage", ["projector", "lora", "full"])
def test_unfrozen_tower_trains_with_any_stage_up_to_the_layer_llava_reads(stage):
    # mm_vision_select_layer -2 of 2 layers reads layer 0's output: layer 1 and the
    # post-layernorm never get a gradient, so they stay frozen.
    assembled = build_llava(tiny(freeze_vision_tower=False), stage, image_size=None, seed=0)
    groups = assembled.parameter_groups()
    tower = names_under(assembled, "model.vision_tower.")
    unread = {name for name in tower if ".encoder.layers.1." in name or ".post_layernorm." in name}
    assert unread and {name for name, _ in groups["vision_tower"]} == tower - unread


def test_every_trainable_tower_parameter_gets_a_gradient():
    assembled = build_llava(tiny(freeze_vision_tower=False), "full", image_size=None, seed=0)
    assembled.model(**collated(assembled)).loss.backward()
    tower = {name: p for name, p in assembled.model.named_parameters() if name.startswith("model.vision_tower.")}
    assert all((p.grad is not None) == p.requires_grad for p in tower.values())


@pytest.mark.parametrize("stage", ["projector", "lora", "full"])
def test_forward_gives_a_finite_loss_and_gradients_exactly_on_trainables(stage):
    assembled = build_llava(tiny(), stage, image_size=None, seed=0)
    out = assembled.model(**collated(assembled))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = {name for name, p in assembled.model.named_parameters() if p.grad is not None}
    assert with_grad == trainable_names(assembled)


def record_calls(module: torch.nn.Module) -> list[bool]:
    """Whether grad was on at each call of ``module``'s forward. (Wrapping forward rather than a
    forward hook: torch's checkpoint recompute runs without module hooks.)"""
    calls: list[bool] = []
    forward = module.forward

    def recorded(*args: object, **kwargs: object) -> object:
        calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    module.forward = recorded
    return calls


def test_lora_adapters_get_sparse_dropout_with_the_profile_p():
    from llavactl.model.dropout import SparseDropout

    assembled = build_llava(tiny(lora_dropout=0.1), "lora", image_size=None, seed=0)
    layers = [m for m in assembled.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(layers) == 4 * assembled.model.config.text_config.num_hidden_layers
    assert all(type(m) is SparseDropout and m.p == 0.1 for m in layers)


def test_frozen_tower_runs_once_without_grad_while_the_llm_is_recomputed():
    assembled = build_llava(tiny(), "lora", image_size=None, seed=0, gradient_checkpointing=True)
    tower_calls = record_calls(assembled.model.model.vision_tower.encoder.layers[0].mlp)
    llm_calls = record_calls(assembled.model.model.language_model.layers[0].mlp)
    assembled.model.train()
    assembled.model(**collated(assembled)).loss.backward()
    assert tower_calls == [False]
    assert llm_calls == [True, True]  # forward, then the checkpointed recompute in backward


def test_config_carries_the_image_token_feature_layer_and_resized_vocab():
    assembled = build_llava(tiny(mm_vision_select_layer=-1), "projector", image_size=None, seed=0)
    config = assembled.model.config
    assert assembled.image_token_id == assembled.tokenizer.convert_tokens_to_ids("<image>") == 259
    assert config.image_token_id == 259
    assert config.vision_feature_layer == -1
    assert config.vision_feature_select_strategy == "default"
    assert config.image_seq_length == assembled.image_spec.num_tokens == 16
    assert assembled.model.get_input_embeddings().num_embeddings == len(assembled.tokenizer) == 260
    assert config.text_config.vocab_size == 260


def test_same_seed_builds_the_same_model_and_another_seed_does_not():
    first = build_llava(tiny(), "lora", image_size=None, seed=3).model.state_dict()
    again = build_llava(tiny(), "lora", image_size=None, seed=3).model.state_dict()
    other = build_llava(tiny(), "lora", image_size=None, seed=4).model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    key = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(first[key], other[key])


def test_linear_projector_is_a_single_trainable_layer():
    assembled = build_llava(tiny(mm_projector_type="linear"), "projector", image_size=None, seed=0)
    projector = assembled.model.model.multi_modal_projector
    assert trainable_names(assembled) == {
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_1.bias",
    }
    features = torch.randn(5, 64)
    assert torch.allclose(projector(features), projector.linear_1(features))
    assert assembled.model.config.projector_hidden_act == "linear"


def test_image_size_override_changes_the_token_count():
    assembled = build_llava(tiny(), "projector", image_size=48, seed=0)
    assert assembled.image_spec.size == 48
    assert assembled.image_spec.num_tokens == 36
    assert torch.isfinite(assembled.model(**collated(assembled)).loss)


# CLIP ViT-L/14-336's vision tower, counted from its config: patch conv (no bias), CLS, 577
# positions, pre-LN, 24 layers of attention (4 projections with bias), 2 LNs and the MLP, post-LN.
_H, _I, _P, _LAYERS = 1024, 4096, 14, 24
CLIP_L_336_TOWER = (
    3 * _P * _P * _H + _H + ((336 // _P) ** 2 + 1) * _H + 2 * _H
    + _LAYERS * (4 * (_H * _H + _H) + 2 * 2 * _H + (_H * _I + _I) + (_I * _H + _H))
    + 2 * _H
)  # fmt: skip
SMOLLM_135M = 134_515_008


def test_local_lite_shapes_build_on_meta_with_the_real_parameter_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(model_name_or_path="HuggingFaceTB/SmolLM-135M", vision_tower="openai/clip-vit-large-patch14-336")
    assembled = build_llava(cfg, "lora", image_size=None, seed=0, device="meta")
    model = assembled.model
    assert assembled.tokenizer is None
    assert assembled.image_spec.num_tokens == 576
    assert CLIP_L_336_TOWER == 303_507_456
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) == CLIP_L_336_TOWER
    llm = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and component_is_llm(n))
    assert llm == SMOLLM_135M + 576  # one embedding row more: `<image>` (tied with lm_head)
    assert assembled.parameter_groups()["lora"]


def component_is_llm(name: str) -> bool:
    return name.startswith(("model.language_model.", "lm_head."))


@pytest.mark.parametrize(("frozen", "select_layer"), [(True, -2), (False, -2), (True, 1), (True, -1), (True, -3)])
def test_tower_stops_after_the_layer_llava_reads_with_the_same_features(frozen, select_layer):
    # Of the tiny tower's 2 layers, -2 and 1 read layer 0's output: layer 1 never runs. -1 reads
    # the last layer; -3 (hidden state 0) is recorded at the first layer's input: all run.
    cfg = tiny(freeze_vision_tower=frozen, mm_vision_select_layer=select_layer)
    assembled = build_llava(cfg, "lora", image_size=None, seed=0)
    tower = assembled.model.model.vision_tower
    last_layer_calls = record_calls(tower.encoder.layers[-1])
    pixels = collated(assembled)["pixel_values"]
    output = assembled.model.model.get_image_features(
        pixels, vision_feature_layer=select_layer, vision_feature_select_strategy="default"
    )
    assert len(last_layer_calls) == (0 if select_layer in (-2, 1) else 1)
    if select_layer == -2:
        assert output.hidden_states[-1] is None  # a layer that did not run is not there to read
    with torch.no_grad():
        # The tower class's own forward, all layers run.
        full = type(tower).forward(tower, pixels, output_hidden_states=True).hidden_states
        expected = assembled.model.model.multi_modal_projector(full[select_layer][:, 1:])
    assert len(full) == 3 and all(h is not None for h in full)
    torch.testing.assert_close(torch.stack(output.pooler_output), expected, rtol=0, atol=0)


@pytest.mark.parametrize("select_layer", [0, 3, -4])
def test_a_select_layer_the_tower_does_not_have_is_a_config_error(select_layer):
    with pytest.raises(ConfigError, match="mm_vision_select_layer") as info:
        build_llava(tiny(mm_vision_select_layer=select_layer), "lora", image_size=None, seed=0)
    assert "from -3 to -1 or from 1 to 2" in (info.value.fix or "")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None])
def test_qlora_computes_in_the_steps_autocast_dtype(dtype: torch.dtype | None) -> None:
    from llavactl.config.loader import load_profile
    from llavactl.model.llms import quantization_config

    model_cfg = load_profile("t4_qlora").profile.model
    assert quantization_config(model_cfg, dtype).bnb_4bit_compute_dtype == (dtype or torch.float32)
