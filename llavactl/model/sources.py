"""What data preparation needs from the model sources: the tokenizer and the tower's image spec.

Both are read without loading any weights, from a `builtin:` name, a local folder or a hub id in
the local Hugging Face cache (see `hub`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llavactl.data.tokens import TokenContext
from llavactl.errors import ModelSourceError
from llavactl.model import builtin, hub

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from llavactl.config.schema import ModelConfig
    from llavactl.data.images import ImageSpec

IMAGE_TOKEN = "<image>"
FIELD = "model.tokenizer_name_or_path"


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``name_or_path`` with `<image>` added as a special token and a pad token.

    A tokenizer without a pad token pads with its unk token, as LLaVA does for Vicuna, or gets a
    new `<pad>` when it has no unk token either.
    """
    from transformers import AddedToken, AutoTokenizer

    name = builtin.builtin_name(name_or_path)
    if name is not None:
        builtin.llm_config(name)  # an unknown builtin name is an error here too
        tokenizer = builtin.tokenizer()
    else:
        folder = hub.locate(name_or_path, FIELD)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelSourceError(
                f"{FIELD}: no tokenizer could be read from `{folder}` ({exc}).",
                fix="point `model.tokenizer_name_or_path` at a folder with the tokenizer files",
            ) from exc
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [AddedToken(IMAGE_TOKEN, special=True, normalized=False)]},
            replace_extra_special_tokens=False,
        )
    return tokenizer


def tower_image_spec(vision_tower: str, image_size: int | None) -> ImageSpec:
    """Input size, patch size and normalisation of ``vision_tower`` (``image_size`` overrides its
    native size), without loading its weights."""
    from llavactl.data.images import ImageSpec
    from llavactl.model import towers

    info = towers.tower_info(vision_tower)
    size = image_size or info.config.image_size
    return ImageSpec(size=size, patch_size=info.config.patch_size, mean=info.mean, std=info.std)


def data_token_context(model_cfg: ModelConfig, image_size: int | None) -> tuple[TokenContext | None, str | None]:
    """The tokenizer, `<image>` id and image spec that `data check` and `data preview` read records
    with, or why they cannot be had here (no weights are needed; offline, no download)."""
    try:
        tokenizer = load_tokenizer(model_cfg.tokenizer_name_or_path or model_cfg.model_name_or_path)
        spec = tower_image_spec(model_cfg.vision_tower, image_size)
    except ModelSourceError as exc:
        return None, exc.message
    return TokenContext(tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), spec), None
