"""Model parts made in code: the `builtin:` LLM, vision tower and tokenizer of the `tiny` profile.

They need no download: configs are written here and weights come from a seeded random init, so
that the `tiny` profile and the tests train a real LLaVA, small enough for a laptop CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llavactl.errors import ModelSourceError

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

PREFIX = "builtin:"

# Special tokens of the byte-level tokenizer, in id order; the 256 byte symbols follow them.
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
_SPECIALS = (BOS, EOS, PAD)
BYTE_VOCAB_SIZE = len(_SPECIALS) + 256

# Llama-shaped, tied embeddings like SmolLM (the local_lite LLM), so the tiny run takes the same
# code paths as the real one. vocab_size is the tokenizer's size before `<image>` is added.
# initializer_range: Llama's 0.02 suits a model thousands wide; at width 64 the same 1/sqrt(width)
# scale is 0.125. From 0.02 the tiny LLM spends its minute learning to spell before it looks at
# the image. Three layers: reading the figure's colour (the minority colour among 16 image tokens,
# in a ~300-token sequence) with two was learned within the minute for some seeds only.
LLMS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "vocab_size": BYTE_VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.125,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    },
}

# CLIP-shaped: 32 px images in 8 px patches give 16 image tokens.
# initializer_factor: CLIP's init (factor 1) is made for a tower that is then trained. Used as is,
# its attention logits have a std of 0.3 (a patch's largest attention weight is 0.08 on average,
# uniform is 0.06), so every patch just gets the image's mean added, and its MLP stays in
# quick_gelu's near-linear range: the features are close to a linear function of each patch's
# mean RGB, from which the colour of a small figure (mixed with the background in most patches)
# is hard to read. Factor 4 scales the logits by 16 (std 4.6, largest weight 0.55): attention
# depends on content, as in a trained tower, and the MLP is nonlinear. An MLP probe on mean-pooled
# `mm_vision_select_layer` features (450 steps of 8 shapes images) names the figure's colour of
# held-out images in 35% of cases with factor 1, 87% with factor 4, 88% with factor 4 and 8 heads
# (a linear probe, factor 1: 37%; chance: 12.5%).
TOWERS: dict[str, dict[str, Any]] = {
    "tiny-clip": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "projection_dim": 64,
        "hidden_act": "quick_gelu",
        "initializer_factor": 4.0,
    },
}


def builtin_name(source: str) -> str | None:
    """The name after `builtin:`, or None when ``source`` is not a builtin source."""
    return source[len(PREFIX) :] if source.startswith(PREFIX) else None


def _unknown(kind: str, name: str, known: dict[str, Any]) -> ModelSourceError:
    choices = ", ".join(f"`{PREFIX}{n}`" for n in known)
    return ModelSourceError(f"There is no builtin {kind} `{PREFIX}{name}`.", fix=f"use one of {choices}")


def llm_config(name: str) -> LlamaConfig:
    """The config of the builtin LLM ``name``."""
    from transformers import LlamaConfig

    if name not in LLMS:
        raise _unknown("LLM", name, LLMS)
    return LlamaConfig(**LLMS[name])


def tower_config(name: str, image_size: int | None = None) -> CLIPVisionConfig:
    """The config of the builtin tower ``name``, at ``image_size`` pixels when given.

    A builtin tower has random weights, so its position embeddings are simply made for the
    requested size instead of being interpolated.
    """
    from transformers import CLIPVisionConfig

    if name not in TOWERS:
        raise _unknown("vision tower", name, TOWERS)
    fields = dict(TOWERS[name])
    if image_size is not None:
        fields["image_size"] = image_size
    return CLIPVisionConfig(**fields)


def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-2 are `<s>`, `</s>`, `<pad>`, then one id per byte.

    Like Llama's tokenizer it puts `<s>` in front of every encoded text and never splits the
    special tokens. Every builtin LLM uses it.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD)
