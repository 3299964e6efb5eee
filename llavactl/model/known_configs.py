"""Configs of the models that bundled profiles name, known without a download.

They let a plan (`dry-run`) build these models on the meta device on a machine that has never
seen them, and let a vision tower saved without `config.json` (the `_safe` layout) be
recognised from its tensor shapes. Values are those of the models' published `config.json`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig, LlamaConfig

# OpenAI CLIP's normalisation (CLIPImageProcessor's defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CLIP_VIT_L_14_336: dict[str, Any] = {
    "image_size": 336,
    "patch_size": 14,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

# Vision towers: CLIPVisionConfig fields. The `_safe` repository is a re-save of the OpenAI
# weights in safetensors, without config files.
TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": _CLIP_VIT_L_14_336,
    "jeromeku/clip-vit-large-patch14-336_safe": _CLIP_VIT_L_14_336,
}

_VICUNA: dict[str, Any] = {
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# Causal LMs: LlamaConfig fields.
LLMS: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM-135M": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "lmsys/vicuna-7b-v1.5": {
        **_VICUNA,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "lmsys/vicuna-13b-v1.5": {
        **_VICUNA,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
    },
}


def tower_config(repo_id: str) -> CLIPVisionConfig | None:
    """The known config of the tower ``repo_id``, or None."""
    from transformers import CLIPVisionConfig

    fields = TOWERS.get(repo_id)
    return None if fields is None else CLIPVisionConfig(**fields)


def llm_config(repo_id: str) -> LlamaConfig | None:
    """The known config of the LLM ``repo_id``, or None."""
    from transformers import LlamaConfig

    fields = LLMS.get(repo_id)
    return None if fields is None else LlamaConfig(**fields)
