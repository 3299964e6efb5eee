"""The record model: LLaVA-format records, their validation, and the interface every store offers.

A record is ``{"id": str | int, "image": path | [paths] (optional), "conversations": [{"from":
"human" | "gpt" | "system", "value": str}, ...]}``; other top-level keys are ignored. Structural
problems become :class:`Problem` values with a stable ``code`` so that ``data check`` can report
all of them and the dataset can name the record it stops on. :class:`RecordSource` is what every
store of records (a JSON/JSONL file, Parquet shards, a mixture) implements.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from llavactl.errors import DataError, excerpt

if TYPE_CHECKING:
    import numpy as np

IMAGE_MARKER = "<image>"
# Integer ids beyond 64 bits are JSON that Arrow, pandas and most other readers cannot hold.
ID_BITS = 63
ROLES = ("human", "gpt", "system")

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record (or with the file, when ``index`` is None)."""

    code: str
    message: str
    index: int | None = None
    id: str | int | None = None
    severity: Severity = "error"
    fix: str | None = None  # where the fix is not the code's own (a problem of the profile)

    def as_json(self) -> dict[str, Any]:
        out = {"index": self.index, "id": self.id, "code": self.code, "severity": self.severity}
        out["message"] = self.message
        return out if self.fix is None else {**out, "fix": self.fix}


class RecordProblem(Exception):
    """Raised while turning one record into training data; carries the problem code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Turn:
    role: str  # "human", "gpt" or "system"
    text: str


@dataclass(frozen=True)
class Record:
    """A structurally valid record. ``images`` are the paths as written in the record."""

    index: int
    id: str | int | None
    images: tuple[str, ...]
    turns: tuple[Turn, ...]
    raw: dict[str, Any] = field(compare=False, repr=False)

    @property
    def marker_count(self) -> int:
        return sum(t.text.count(IMAGE_MARKER) for t in self.turns)

    def describe(self) -> str:
        """How messages name this record: its index and id."""
        return f"record {self.index} (id {self.id!r})"


@dataclass(frozen=True)
class RawRecord:
    """One decoded JSON value of the data file, before validation."""

    index: int
    line: int  # 1-based line where the record starts in the file
    value: Any


def decode_json(text: str, line_offset: int = 0, column_offset: int = 0) -> Any:
    """``json.loads``, with every way it fails as a ValueError whose message gives the line (and
    the column: ``column_offset`` is added on the text's first line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        column = e.colno + (column_offset if e.lineno == 1 else 0)
        raise ValueError(f"line {e.lineno + line_offset}, column {column}: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"line {line_offset + 1}: values nested too deeply to read (thousands of levels)") from None
    except ValueError:
        # Python converts no integer of over 4,300 digits (a denial-of-service guard).
        raise ValueError(f"line {line_offset + 1}: a number of over 4,300 digits") from None


def parse_record(raw: RawRecord) -> Record:
    """Validate the structure of one record; raise :class:`RecordProblem` on the first issue."""
    value = raw.value
    if not isinstance(value, dict):
        raise RecordProblem("missing_field", f"a record must be a JSON object, got {type(value).__name__}")
    rid = value.get("id")
    # JSON's true/false are Python ints (True == 1): an id of them would collide with 1 and 0.
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise RecordProblem("missing_field", f"`id` must be a string or an integer, got {excerpt(rid)}")
    if isinstance(rid, int) and not _fits_64_bits(rid):
        raise RecordProblem(
            "missing_field", f"`id` {excerpt(rid)} is outside the 64-bit integers; write it as a string"
        )
    if isinstance(rid, str):
        _require_text(rid, "`id`")
    images = _parse_images(value)
    conversations = value.get("conversations")
    if conversations is None:
        other = (
            " (`messages`, the role/content layout, is read from Parquet shards only)" if "messages" in value else ""
        )
        raise RecordProblem("missing_field", f"no `conversations` list{other}")
    if not isinstance(conversations, list) or not conversations:
        raise RecordProblem("missing_field", "`conversations` must be a non-empty list of turns")
    turns = tuple(_parse_turn(i, t) for i, t in enumerate(conversations))
    _check_turn_order(turns)
    return Record(raw.index, rid, images, turns, value)


def _fits_64_bits(n: int) -> bool:
    return -(2**ID_BITS) <= n < 2**ID_BITS


def _parse_images(value: dict[str, Any]) -> tuple[str, ...]:
    image = value.get("image")
    if image is None:
        if value.get("images") is not None:
            raise RecordProblem(
                "missing_field",
                "`images` is read from Parquet shards only: a JSON record names its images in "
                "`image` (a path or a list of paths)",
            )
        return ()
    if isinstance(image, str) and image:
        paths: tuple[str, ...] = (image,)
    elif isinstance(image, list) and image and all(isinstance(p, str) and p for p in image):
        paths = tuple(image)
    else:
        raise RecordProblem(
            "missing_field", f"`image` must be a path or a non-empty list of paths, got {excerpt(image)}"
        )
    for k, path in enumerate(paths):
        # A file name that is not UTF-8 reaches JSON only as such a surrogate: rename the file.
        _require_text(path, "`image`" if len(paths) == 1 else f"`image` {k}")
    return paths


def _parse_turn(position: int, turn: Any) -> Turn:
    if not isinstance(turn, dict):
        raise RecordProblem("missing_field", f"turn {position} must be an object with `from` and `value`")
    for key in ("from", "value"):
        if key not in turn:
            raise RecordProblem("missing_field", f"turn {position} has no `{key}`")
    role, text = turn["from"], turn["value"]
    if not isinstance(role, str) or role not in ROLES:
        raise RecordProblem("bad_role", f"turn {position} has role {excerpt(role)}; expected one of {', '.join(ROLES)}")
    if not isinstance(text, str):
        raise RecordProblem("missing_field", f"turn {position} `value` must be a string, got {type(text).__name__}")
    _require_text(text, f"turn {position} `value`")
    return Turn(role, text)


def _require_text(text: str, what: str) -> None:
    """Refuse a lone UTF-16 surrogate (JSON's ``\\ud800``): no tokenizer or file can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordProblem(
            "bad_text",
            f"{what} holds a lone surrogate ({text[e.start]!r} at character {e.start}), half of a UTF-16 pair, "
            "which is not text in any encoding",
        ) from None


def _check_turn_order(turns: tuple[Turn, ...]) -> None:
    # An optional system turn, then human/gpt pairs: the shape every template renders.
    offset = 1 if turns[0].role == "system" else 0
    body = turns[offset:]
    if not body:
        raise RecordProblem("bad_role", "the record has a system turn but no human/gpt turns")
    for k, turn in enumerate(body):
        expected = "human" if k % 2 == 0 else "gpt"
        if turn.role != expected:
            raise RecordProblem(
                "bad_role",
                f"turn {k + offset} is {turn.role!r} where {expected!r} was expected (turns alternate "
                "human, gpt, human, ... after an optional first system turn)",
            )
    if body[-1].role != "gpt":
        raise RecordProblem("bad_role", "the last turn is 'human'; a record ends with a 'gpt' reply")


def check_image_markers(record: Record) -> None:
    """The number of ``<image>`` markers must equal the number of images (0 adds one per image)."""
    markers, n = record.marker_count, len(record.images)
    if markers and markers != n:
        raise RecordProblem(
            "image_token_mismatch", f"{markers} `<image>` marker(s) in the text but {n} image(s) in `image`"
        )


def parse_raw(raw: RawRecord) -> Record | Problem:
    """The record, or the structural problem that stops it."""
    try:
        return parse_record(raw)
    except RecordProblem as p:
        rid = raw.value.get("id") if isinstance(raw.value, dict) else None
        return Problem(p.code, p.message, raw.index, _reportable_id(rid))


def iter_records(raws: Iterable[RawRecord]) -> Iterator[tuple[RawRecord, Record | Problem]]:
    """Parse each raw record, yielding the record or the structural problem that stops it."""
    for raw in raws:
        yield raw, parse_raw(raw)


def _reportable_id(rid: Any) -> str | int | None:
    """A bad record's id as reports can write it: None when it is no id, escaped when it is no text."""
    if isinstance(rid, int) and not _fits_64_bits(rid):
        return None
    if isinstance(rid, str):
        return rid.encode("utf-8", "backslashreplace").decode("utf-8")
    return rid if isinstance(rid, int) else None


@runtime_checkable
class RecordSource(Protocol):
    """The records of a data set, decoded when read: what every store implements (a JSON/JSONL file's
    :class:`~llavactl.data.json_index.RecordStore`, :class:`~llavactl.data.parquet.ParquetStore`,
    :class:`~llavactl.data.mixture.MixtureStore`) and every reader of data reads.

    ``path`` is what was opened (a file, a folder or glob of shards, a mixture file); ``kind`` the
    store's layout (``list`` or ``jsonl`` for a file, ``shards``, ``mixture``); ``problems`` the data's
    own problems (a JSON list whose structure is broken: then it has no records); ``key`` names the
    data and its version for what is cached of it (None when nothing is kept, as for a small file).
    """

    path: Path
    kind: str
    key: str | None
    problems: list[Problem]

    def __len__(self) -> int: ...

    def raw(self, i: int) -> RawRecord:
        """Record ``i`` decoded; :class:`RecordProblem` ``bad_json`` when it cannot be."""
        ...

    def parsed(self, indices: Iterable[int] | None = None) -> Iterator[Record | Problem]:
        """Each record (all, or ``indices``) as a valid record or the problem that stops it."""
        ...

    def __iter__(self) -> Iterator[RawRecord]: ...

    def has_image(self) -> np.ndarray:
        """Whether each record has an image (an estimate where deciding it would decode every record)."""
        ...

    def sizes(self) -> np.ndarray:
        """Each record's size (bytes or characters of text): for ordering by length, not for counting."""
        ...

    def files(self) -> list[Path]:
        """The files the records are read from (what no output may overwrite)."""
        ...

    def where(self, i: int) -> str | None:
        """How messages name record ``i`` beyond its index (a shard's row, a mixture's source); None
        when its index says it all."""
        ...


def parse_each(store: RecordSource, indices: Iterable[int] | None) -> Iterator[Record | Problem]:
    """Each record of ``store`` (all, or ``indices``) as a valid record or the problem that stops it."""
    for i in range(len(store)) if indices is None else indices:
        try:
            raw = store.raw(i)
        except RecordProblem as p:
            yield Problem(p.code, p.message, i)
            continue
        yield parse_raw(raw)


def require_records(
    store: RecordSource, name: str, *, empty_fix: str = "point it at the file that holds the records"
) -> None:
    """:class:`DataError` unless ``store`` holds records: a file that cannot be read as records (its
    first problem, with its place in the file) or one that holds none. ``name`` is how the message
    names the data (a path, or a mixture's entry and path)."""
    if store.problems:
        raise DataError(
            f"{name} cannot be read as records: {store.problems[0].message}",
            fix="correct the file where it says (`llavactl data check` lists every problem)",
        )
    if not len(store):
        raise DataError(f"{name} holds no records", fix=empty_fix)


class Parts:
    """Record ``i`` of parts of ``counts`` records each, laid end to end, as (part, offset in it)."""

    def __init__(self, counts: Iterable[int]) -> None:
        import numpy as np

        self._starts = np.cumsum([0, *counts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """The part of record ``i`` and its offset there; IndexError outside ``0 .. len - 1``."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        import numpy as np

        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, i - int(self._starts[k])
