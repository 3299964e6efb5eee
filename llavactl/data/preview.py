"""``data preview``: what a record really trains on, from the same ids and labels as training.

The ids are cut into runs of masked, supervised and image tokens; each run is decoded as the
difference between decoding everything up to its end and up to its start, so that the spaces a
tokenizer attaches to a run's first token are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from llavactl.data.templates import IGNORE_INDEX, Encoded

RunKind = Literal["masked", "supervised", "image"]


@dataclass(frozen=True)
class Run:
    kind: RunKind
    text: str
    tokens: int


@dataclass(frozen=True)
class PreviewItem:
    index: int
    id: str | int | None
    runs: list[Run]

    @property
    def prompt(self) -> str:
        return "".join(r.text for r in self.runs)

    @property
    def supervised(self) -> list[str]:
        return [r.text for r in self.runs if r.kind == "supervised"]

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "prompt": self.prompt, "supervised": self.supervised}


def image_label(tokens: int) -> str:
    return f"<image x{tokens}>"


def runs_of(encoded: Encoded, tokenizer: Any, image_token_id: int) -> list[Run]:
    """The ids as consecutive runs of one kind, decoded; image runs collapsed to ``<image xN>``."""
    kinds: list[RunKind] = [
        "image" if t == image_token_id else "supervised" if label != IGNORE_INDEX else "masked"
        for t, label in zip(encoded.input_ids, encoded.labels, strict=True)
    ]
    runs: list[Run] = []
    decoded_upto = ""
    start = 0
    for end in range(1, len(kinds) + 1):
        if end < len(kinds) and kinds[end] == kinds[start]:
            continue
        kind, count = kinds[start], end - start
        text = tokenizer.decode(encoded.input_ids[:end], skip_special_tokens=False)
        piece = (
            text[len(decoded_upto) :]
            if text.startswith(decoded_upto)
            else tokenizer.decode(encoded.input_ids[start:end], skip_special_tokens=False)
        )
        runs.append(Run(kind, image_label(count) if kind == "image" else piece, count))
        decoded_upto, start = text, end
    return runs
