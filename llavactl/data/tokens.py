"""What counting a record's tokens needs of the model: its tokenizer, image token and image spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llavactl.data.images import ImageSpec


@dataclass(frozen=True)
class TokenContext:
    """What the length and mask checks need; absent when the tokenizer or tower cannot be had."""

    tokenizer: Any
    image_token_id: int
    spec: ImageSpec
