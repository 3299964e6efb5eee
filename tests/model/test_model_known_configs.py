"""The known configs build the real models' shapes: parameter counts equal the published models'."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel, LlamaForCausalLM

from llavactl.model import known_configs


@pytest.mark.parametrize(
    ("repo_id", "parameters"),
    [
        ("HuggingFaceTB/SmolLM-135M", 134_515_008),
        ("lmsys/vicuna-7b-v1.5", 6_738_415_616),
        ("lmsys/vicuna-13b-v1.5", 13_015_864_320),
    ],
)
def test_known_llm_has_the_published_parameter_count(repo_id, parameters):
    with torch.device("meta"):
        model = LlamaForCausalLM(known_configs.llm_config(repo_id))
    assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.mark.parametrize("repo_id", ["openai/clip-vit-large-patch14-336", "jeromeku/clip-vit-large-patch14-336_safe"])
def test_known_clip_large_336_tower_has_303_5m_parameters(repo_id):
    with torch.device("meta"):
        model = CLIPVisionModel(known_configs.tower_config(repo_id))
    assert sum(p.numel() for p in model.parameters()) == 303_507_456


def test_unknown_ids_have_no_config():
    assert known_configs.llm_config("acme/llm") is None
    assert known_configs.tower_config("acme/tower") is None
