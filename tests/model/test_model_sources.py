"""Model sources: the builtin tokenizer, real tokenizers, local folders, the `_safe` tower layout,
pickle-only weights and hub ids read from the local Hugging Face cache with HF_HUB_OFFLINE."""

from __future__ import annotations

import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, LlamaForCausalLM

from llavactl.config.schema import ModelConfig
from llavactl.errors import ModelSourceError
from llavactl.model import builtin, weight_files
from llavactl.model.assembly import build_llava
from llavactl.model.known_configs import CLIP_MEAN, CLIP_STD
from llavactl.model.sources import load_tokenizer, tower_image_spec
from llavactl.model.towers import load_tower

SENTENCEPIECE = Path(__file__).parents[2] / ".venv/lib/python3.11/site-packages/mistral_common/data/tokenizer.model.v1"


def tiny_clip(seed: int = 0, **vision: object) -> CLIPModel:
    """A full CLIP (text and vision) with the builtin tiny tower's shapes, like openai's files."""
    torch.manual_seed(seed)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # fmt: skip
    return CLIPModel(CLIPConfig(text_config=text, vision_config={**builtin.TOWERS["tiny-clip"], **vision}))


def hub_snapshot(cache: Path, repo_id: str) -> Path:
    """The folder of `repo_id` at one revision in a Hugging Face cache, as the hub client lays it out."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    return snapshot


def test_builtin_tokenizer_is_byte_level_with_its_special_tokens():
    tok = load_tokenizer("builtin:tiny-llama")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    image = tok.convert_tokens_to_ids("<image>")
    assert image == 259 == len(tok) - 1
    ids = tok("a<image>é").input_ids
    assert ids == [0, tok.convert_tokens_to_ids("a"), image, *tok("é", add_special_tokens=False).input_ids]
    assert len(ids) == 5  # é is two bytes
    assert tok.decode(ids, skip_special_tokens=True) == "aé"


def test_unknown_builtin_name_lists_the_known_ones():
    with pytest.raises(ModelSourceError) as caught:
        load_tokenizer("builtin:tiny-mistral")
    assert caught.value.fix == "use one of `builtin:tiny-llama`"


def test_llama_tokenizer_pads_with_unk_and_gains_an_image_token(tmp_path):
    from transformers import LlamaTokenizer

    shutil.copy(SENTENCEPIECE, tmp_path / "tokenizer.model")
    LlamaTokenizer.from_pretrained(tmp_path).save_pretrained(tmp_path / "vicuna")
    tok = load_tokenizer(str(tmp_path / "vicuna"))
    assert tok.pad_token == tok.unk_token == "<unk>"
    assert tok.convert_tokens_to_ids("<image>") == 32000
    assert len(tok) == 32001
    assert 32000 in tok("USER: <image>\nWhat is it?").input_ids


def test_tower_image_spec_of_a_builtin_tower_and_an_override():
    spec = tower_image_spec("builtin:tiny-clip", None)
    assert (spec.size, spec.patch_size, spec.num_tokens) == (32, 8, 16)
    assert (spec.mean, spec.std) == (CLIP_MEAN, CLIP_STD)
    assert tower_image_spec("builtin:tiny-clip", 64).num_tokens == 64


def test_known_tower_needs_no_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = tower_image_spec("openai/clip-vit-large-patch14-336", None)
    assert (spec.size, spec.patch_size, spec.num_tokens) == (336, 14, 576)


def test_safe_layout_tower_loads_with_its_config_taken_from_shapes(tmp_path):
    """jeromeku/clip-vit-large-patch14-336_safe's layout: one pytorch_model.safetensors of full
    CLIP keys, no config.json, no preprocessor_config.json."""
    clip = tiny_clip()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "pytorch_model.safetensors")
    tower = load_tower(str(tmp_path), image_size=None, seed=0, device="cpu")
    assert tower.config.num_attention_heads == 8  # from the known-tower table: shapes cannot say
    assert torch.equal(tower.encoder.layers[1].mlp.fc1.weight, clip.vision_model.encoder.layers[1].mlp.fc1.weight)
    spec = tower_image_spec(str(tmp_path), None)
    assert (spec.size, spec.patch_size, spec.mean, spec.std) == (32, 8, CLIP_MEAN, CLIP_STD)


def test_safe_layout_with_shapes_of_no_known_tower_asks_for_a_config(tmp_path):
    clip = tiny_clip(hidden_size=48)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "pytorch_model.safetensors")
    with pytest.raises(ModelSourceError, match="hidden_size=48") as caught:
        tower_image_spec(str(tmp_path), None)
    assert "config.json" in caught.value.fix


def pickle_only_tower(folder: Path) -> CLIPModel:
    clip = tiny_clip()
    clip.config.save_pretrained(folder)
    torch.save(clip.state_dict(), folder / "pytorch_model.bin")
    return clip


def test_pickle_only_tower_is_refused_on_torch_older_than_2_6(tmp_path, monkeypatch):
    pickle_only_tower(tmp_path)
    monkeypatch.setattr(weight_files, "torch_version", lambda: (2, 5))
    with pytest.raises(ModelSourceError, match=r"torch\.load") as caught:
        load_tower(str(tmp_path), image_size=None, seed=0, device="cpu")
    assert "pytorch_model.bin" in caught.value.message
    assert "pip install 'torch>=2.6'" in caught.value.fix
    assert "safetensors" in caught.value.fix


def test_pickle_only_tower_loads_through_weights_only_unpickling(tmp_path):
    clip = pickle_only_tower(tmp_path)
    tower = load_tower(str(tmp_path), image_size=None, seed=0, device="cpu")
    assert torch.equal(tower.post_layernorm.weight, clip.vision_model.post_layernorm.weight)


def test_a_pickle_holding_python_objects_is_refused(tmp_path):
    pickle_only_tower(tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": pathlib.PurePosixPath("/etc/passwd")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="could not be loaded as plain tensors"):
        load_tower(str(tmp_path), image_size=None, seed=0, device="cpu")


def test_safetensors_are_preferred_over_pickle_in_the_same_folder(tmp_path, monkeypatch):
    clip = pickle_only_tower(tmp_path)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "model.safetensors")
    monkeypatch.setattr(weight_files, "torch_version", lambda: (2, 5))  # a pickle read would fail
    tower = load_tower(str(tmp_path), image_size=None, seed=0, device="cpu")
    assert torch.equal(tower.post_layernorm.weight, clip.vision_model.post_layernorm.weight)


def test_hub_ids_are_read_from_the_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = tiny_clip()
    clip.save_pretrained(hub_snapshot(tmp_path, "acme/tiny-clip"))
    torch.manual_seed(1)
    llm = LlamaForCausalLM(builtin.llm_config("tiny-llama"))
    llm_folder = hub_snapshot(tmp_path, "acme/tiny-llama")
    llm.save_pretrained(llm_folder)
    builtin.tokenizer().save_pretrained(llm_folder)

    cfg = ModelConfig(model_name_or_path="acme/tiny-llama", vision_tower="acme/tiny-clip")
    assembled = build_llava(cfg, "lora", image_size=None, seed=0)
    model = assembled.model.model
    assert torch.equal(model.vision_tower.post_layernorm.weight, clip.vision_model.post_layernorm.weight)
    layer = model.language_model.layers[1].mlp.down_proj.weight
    assert torch.equal(layer, llm.model.layers[1].mlp.down_proj.weight)
    assert assembled.image_token_id == 259


def test_a_hub_id_missing_from_the_cache_offline_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE is set") as caught:
        load_tokenizer("acme/not-downloaded")
    assert "hf download acme/not-downloaded" in caught.value.fix


def test_a_path_that_is_no_folder_is_an_error(tmp_path):
    with pytest.raises(ModelSourceError, match="is not a folder, a `builtin:` name or a Hugging Face hub id"):
        load_tokenizer(str(tmp_path / "no" / "such" / "folder"))


def test_a_pretrained_tower_at_another_image_size_interpolates_its_positions(tmp_path):
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(builtin.tower_config("tiny-clip")).save_pretrained(tmp_path / "tower")
    cfg = ModelConfig(model_name_or_path="builtin:tiny-llama", vision_tower=str(tmp_path / "tower"))
    assembled = build_llava(cfg, "projector", image_size=48, seed=0)
    assert assembled.image_spec.num_tokens == 36
    assert assembled.model.config.vision_config.image_size == 32  # the tower keeps its native size
    features = assembled.model.model.get_image_features(pixel_values=torch.randn(2, 3, 48, 48)).pooler_output
    assert [tuple(f.shape) for f in features] == [(36, 64), (36, 64)]


def test_a_siglip_tower_keeps_every_patch_and_normalises_with_one_half(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    SiglipVisionModel(config).save_pretrained(tmp_path / "siglip")
    spec = tower_image_spec(str(tmp_path / "siglip"), None)
    assert (spec.num_tokens, spec.mean, spec.std) == (16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    cfg = ModelConfig(model_name_or_path="builtin:tiny-llama", vision_tower=str(tmp_path / "siglip"))
    assembled = build_llava(cfg, "projector", image_size=None, seed=0)
    assert assembled.model.config.vision_feature_select_strategy == "full"  # SigLIP has no CLS token
    pixels = torch.randn(1, 3, 32, 32)
    features = assembled.model.model.get_image_features(pixel_values=pixels).pooler_output
    assert tuple(features[0].shape) == (16, 64)
    # The tower stops after the layer LLaVA reads (-2); the features are those of a full run.
    tower = assembled.model.model.vision_tower
    with torch.no_grad():
        full = type(tower).forward(tower, pixels, output_hidden_states=True).hidden_states
        expected = assembled.model.model.multi_modal_projector(full[-2])
    torch.testing.assert_close(features[0], expected[0], rtol=0, atol=0)
