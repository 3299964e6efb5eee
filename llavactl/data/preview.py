"""``data preview``: what a record really trains on, from the same ids and labels as training.

The ids are cut into runs of masked, supervised and image tokens; each run is decoded as the
difference between decoding everything up to its end and up to its start, so that the spaces a
tokenizer attaches to a run's first token are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llavactl.data.templates import IGNORE_INDEX, Encoded
from llavactl.errors import DataError

if TYPE_CHECKING:
    from llavactl.config.schema import DataConfig
    from llavactl.data.records import RecordSource
    from llavactl.data.tokens import TokenContext

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

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.runs)

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


@dataclass(frozen=True)
class PreviewProblem:
    """A record that cannot be previewed: its problem code and message."""

    index: int
    id: str | int | None
    problem: str

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "problem": self.problem}


def preview_records(
    records: Path | RecordSource,
    data: DataConfig,
    tokens: TokenContext,
    *,
    n: int,
    index: int | None = None,
    seed: int = 0,
) -> list[PreviewItem | PreviewProblem]:
    """The first ``n`` records of ``records`` (opened, or a path) (or record ``index`` alone) as
    training prepares them."""
    from llavactl.data.records import Problem, RecordProblem, require_records
    from llavactl.data.source import records_of
    from llavactl.data.templates import encoder_for, prepare

    store = records_of(records, seed)
    records_path = store.path
    require_records(store, str(records_path))
    if index is not None and not 0 <= index < len(store):
        raise DataError(
            f"{records_path} has no record {index} ({len(store)} records read)",
            fix=f"pick an index below {len(store)}",
        )
    chosen = [index] if index is not None else range(min(n, len(store)))
    template = data.conversation_template
    encoder = encoder_for(tokens.tokenizer, tokens.image_token_id, tokens.spec.num_tokens, template)
    out: list[PreviewItem | PreviewProblem] = []
    for parsed in store.parsed(chosen):
        if isinstance(parsed, Problem):
            out.append(PreviewProblem(parsed.index or 0, parsed.id, f"{parsed.code}: {parsed.message}"))
            continue
        try:
            prepared = prepare(parsed, template, encoder, data.max_seq_len)
        except RecordProblem as e:
            out.append(PreviewProblem(parsed.index, parsed.id, f"{e.code}: {e.message}"))
            continue
        out.append(
            PreviewItem(parsed.index, parsed.id, runs_of(prepared.encoded, tokens.tokenizer, tokens.image_token_id))
        )
    return out


def packed_spans(items: list[PreviewItem | PreviewProblem]) -> list[tuple[PreviewItem, int, int]]:
    """Where each previewable record lies in one padding-free row of them, in order: ``(item, start,
    end)`` token positions (its position ids restart at 0 at ``start``). Records that cannot be
    built are left out, as training leaves them out of its rows."""
    spans, start = [], 0
    for item in items:
        if isinstance(item, PreviewItem):
            spans.append((item, start, start + item.tokens))
            start += item.tokens
    return spans
