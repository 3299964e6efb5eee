"""The records of a data file, indexed once and read one at a time.

A JSON list of 665K records parses into ~3.5 GiB of Python objects per process; held that way, every
rank of a run keeps its own copy. Instead the file is scanned once for where each element starts
and ends (vectorised over the bytes with numpy, faster than ``json.load``, which it does not replace:
an element is decoded when it is read), and the offsets are kept in a small index file in the
llavactl cache (``$LLAVACTL_CACHE/records``), named by the data file's path and fingerprint (size,
mtime, ctime, inode, device) so that a changed file never meets a stale index. The index is
memory-mapped and a record is read with ``pread``: what a process holds is the index (32 bytes a
record), and the file's pages live once in the OS page cache for every rank.

One :class:`RecordStore` per file and process (:func:`open_json` memoises it), so that doctor's
checks, the planner and the dataset of one command read the file once. What opens a data file of any
kind is :mod:`llavactl.data.source`.
"""

from __future__ import annotations

import codecs
import functools
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llavactl.data import cache
from llavactl.data.records import Problem, RawRecord, Record, RecordProblem, decode_json, iter_records, parse_each
from llavactl.errors import DataError

Kind = Literal["list", "jsonl"]
# Bump when the index layout or the scan changes: old index files are then never read.
INDEX_VERSION = 1
CHUNK_BYTES = 8 << 20
# Read past a chunk's end so that an `"image":` key cut by the chunk's end is still seen.
OVERLAP_BYTES = 64
BOM = codecs.BOM_UTF8
WHITESPACE = b" \t\r\n"
# The key of a record's images, as an estimate of which records have one (see `has_image`).
_IMAGE_KEY = b'"image"'
_IMAGE_KEY_LINE = re.compile(rb'"image"[ \t\r\n]*:')
# Columns of the index: where an element's bytes start and end, the 1-based line of the byte
# before its start (its separator), and whether it has an `"image"` key.
START, END, LINE, IMAGE = range(4)
_QUOTE, _BACKSLASH, _COMMA, _NEWLINE = 34, 92, 44, 10
# `[` and `{` are 0x5B and 0x7B, `]` and `}` 0x5D and 0x7D: with bit 0x20 set, one test each.
_OPEN, _CLOSE = 0x7B, 0x7D
# The bytes the list's scan looks at (1, all others 0), picked out by one `bytes.translate`.
_LOOKED_AT = bytes(int(b in b'"[]{},\n') for b in range(256))
_AFTER_KEY = np.frombuffer(b": \t\r\n", np.uint8)


class _BadList(Exception):
    """The JSON list's structure does not hold (unbalanced, unterminated, an empty element)."""


class RecordStore:
    """The elements of a LLaVA data file (JSON list or JSONL), decoded when read.

    ``problems`` holds the file's own problem (a JSON list whose structure is broken), in which
    case it has no records. ``key`` names the file's path and fingerprint (what is cached of it is
    filed under it; None for a small file, of which nothing is kept, or one scanned but not opened
    by :func:`open_json`).
    """

    def __init__(
        self, path: Path, kind: Kind, index: np.ndarray, problems: list[Problem], key: str | None = None
    ) -> None:
        self.path = path
        self.key = key
        self.kind = kind
        self.problems = problems
        self._index = index
        self._file: Any = None

    def __len__(self) -> int:
        return len(self._index)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn get a copy: an open file does not travel, the index does.
        return {**self.__dict__, "_file": None, "_index": np.asarray(self._index)}

    def _read(self, start: int, end: int) -> bytes:
        if self._file is None:
            self._file = self.path.open("rb", buffering=0)
        # pread moves no shared file position: forked DataLoader workers may share the descriptor.
        return os.pread(self._file.fileno(), end - start, start)

    def raw(self, i: int) -> RawRecord:
        """Element ``i`` decoded; :class:`RecordProblem` ``bad_json`` when it is not JSON."""
        start, end, line = (int(x) for x in self._index[i, :IMAGE])
        data = self._read(start, end)
        body = data.lstrip(WHITESPACE)
        lead = data[: len(data) - len(body)]
        body = body.rstrip(WHITESPACE)
        line += lead.count(b"\n")
        # Exact after a newline and on a JSONL line; in a list written on one line the columns of
        # an element's first line count from its separator.
        column = len(lead) - lead.rfind(b"\n") - 1
        try:
            value = decode_json(body.decode("utf-8"), line - 1, column)
        except ValueError as e:
            raise RecordProblem("bad_json", str(e)) from None
        return RawRecord(i, line, value)

    def parsed(self, indices: Iterable[int] | None = None) -> Iterator[Record | Problem]:
        """Each element (all, or ``indices``) as a valid record or the problem that stops it."""
        return parse_each(self, indices)

    def __iter__(self) -> Iterator[RawRecord]:
        """Every element decoded; stops with :class:`RecordProblem` at one that is not JSON."""
        return (self.raw(i) for i in range(len(self)))

    def has_image(self) -> np.ndarray:
        """Whether each element has an ``"image"`` key, from its bytes: an estimate (a null image,
        or the key inside a turn, counts too) for what must not decode every record."""
        return np.asarray(self._index[:, IMAGE], dtype=bool)

    def sizes(self) -> np.ndarray:
        """Each element's size in bytes."""
        return np.asarray(self._index[:, END] - self._index[:, START])

    def files(self) -> list[Path]:
        """The files the records are read from (what no output may overwrite)."""
        return [self.path]

    def where(self, i: int) -> None:
        """How messages name element ``i`` beyond its index: nothing (a shard's row is named; see
        :class:`~llavactl.data.parquet.ParquetStore`)."""
        return None

    def file_problem(self) -> Problem:
        """A JSON list with an element that is not JSON is not JSON: the file's problem as
        ``json`` words it, with the line and column in the file (decodes the whole file)."""
        return _list_problem(self.path)


def _list_problem(path: Path) -> Problem:
    try:
        decode_json(path.read_text(encoding="utf-8-sig"))
    except ValueError as e:
        return Problem("bad_json", str(e))
    return Problem("bad_json", "the file is JSON, but not a list of records")


def open_json(path: Path) -> RecordStore:
    """The store of the JSON/JSONL file ``path``, shared by every caller in this process while the
    file is unchanged. Raises :class:`DataError` when the file is missing, unreadable or not UTF-8 text."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(
            f"data file {path} does not exist", fix="set `data.data_path` to an existing JSON or JSONL file"
        ) from None
    except OSError as e:
        raise DataError(f"data file {path} cannot be read ({e.strerror or e})", fix="check its permissions") from None
    return _open(path.resolve(), cache.file_stamp(st))


# One entry per data file in use: a mixture opens each of its sources, and each command opens its
# whole mixture again (doctor, planner, dataset); an evicted entry would be read again.
@functools.lru_cache(maxsize=32)
def _open(path: Path, fingerprint: tuple[int, ...]) -> RecordStore:
    cached = index_path(path, fingerprint)
    if (kept := _kept_index(path, cached)) is not None:
        return kept
    if fingerprint[0] < cache.CACHE_MIN_BYTES:
        return _scanned(path, fingerprint, cached)
    # The ranks of a run start together: one scans while the others wait, then read its index.
    with cache.scan_lock(cached):
        if (kept := _kept_index(path, cached)) is not None:
            return kept
        return _scanned(path, fingerprint, cached)


def _kept_index(path: Path, cached: Path) -> RecordStore | None:
    if cached.is_file():
        try:
            index = np.load(cached, mmap_mode="r")
            if index[0, 0] == INDEX_VERSION:
                return RecordStore(path, "list" if index[0, 1] == 0 else "jsonl", index[1:], [], cached.stem)
        except (OSError, ValueError, IndexError):
            pass  # unreadable: scanned again and written anew
    return None


def _scanned(path: Path, fingerprint: tuple[int, ...], cached: Path) -> RecordStore:
    try:
        kind, index, problems = scan(path)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except OSError as e:
        raise DataError(f"data file {path} cannot be read ({e.strerror or e})", fix="check its permissions") from None
    if fingerprint[0] < cache.CACHE_MIN_BYTES:
        return RecordStore(path, kind, index, problems)  # nothing of a small file is kept
    # Not when the file changed while it was scanned: the index would be of neither version.
    if not problems and cache.file_stamp(path.stat()) == fingerprint:
        header = np.array([[INDEX_VERSION, 0 if kind == "list" else 1, 0, 0]], dtype=np.int64)
        cache.keep(cached, index=np.concatenate([header, index]))
    return RecordStore(path, kind, index, problems, cached.stem)


def index_path(path: Path, fingerprint: tuple[int, ...]) -> Path:
    """Where the index of ``path`` with this fingerprint lives in the cache."""
    return cache.cache_root() / "records" / f"{cache.keyed_name(path, (INDEX_VERSION, fingerprint))}.npy"


def read_raw_records(path: Path) -> tuple[list[RawRecord], list[Problem]]:
    """Every element of ``path`` (a JSON list, or JSONL) decoded; see :class:`RecordStore`.

    A JSON list that does not parse gives one ``bad_json`` problem and no records; in JSONL each
    bad line gives its own problem and the other lines still load.
    """
    store = open_json(path)
    records: list[RawRecord] = []
    problems = list(store.problems)
    for i in range(len(store)):
        try:
            records.append(store.raw(i))
        except RecordProblem as p:
            if store.kind == "list":
                return [], [store.file_problem()]
            problems.append(Problem(p.code, p.message, i))
    return records, problems


def load_records(path: Path) -> list[Record]:
    """Read and validate every record of a (small) file; raise :class:`DataError` naming the first bad one."""
    raws, problems = read_raw_records(path)
    if problems:
        p = problems[0]
        where = f" (record {p.index})" if p.index is not None else ""
        raise DataError(f"{path}: invalid JSON{where}: {p.message}", fix=f"run `llavactl data check` on {path}")
    records = []
    for raw, parsed in iter_records(raws):
        if isinstance(parsed, Problem):
            raise DataError(
                f"{path}: record {raw.index} (id {parsed.id!r}, line {raw.line}): {parsed.code}: {parsed.message}",
                fix="fix or drop the record; `llavactl data check --write-clean FILE` writes the data without "
                "bad records",
            )
        records.append(parsed)
    return records


_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _not_utf8(path: Path) -> DataError:
    """Why ``path`` is not UTF-8 text, in terms that lead to the fix: UTF-16 or UTF-32 (by the byte-
    order mark, or the NUL bytes among the first characters), else the first byte that is not UTF-8
    and its line (Latin-1 and Windows-1252 files have such bytes). Reads the file again: an error path."""
    with path.open("rb") as f:
        head = f.read(4)
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            return DataError(
                f"data file {path} is {name} text (it starts with {name}'s byte-order mark), not UTF-8",
                fix=f"re-encode it as UTF-8, e.g. `iconv -f {name} -t UTF-8 {path} > {path.stem}-utf8{path.suffix}`",
            )
    if b"\x00" in head:
        return DataError(
            f"data file {path} is not UTF-8 text: its first bytes hold NUL bytes, as UTF-16 or UTF-32 text does",
            fix=f"re-encode it as UTF-8, e.g. `iconv -f UTF-16LE -t UTF-8 {path} > {path.stem}-utf8{path.suffix}`",
        )
    found = _first_bad_byte(path)
    where = f": byte 0x{found[3]:02x} at line {found[1]:,}, column {found[2]:,} is not UTF-8" if found else ""
    return DataError(
        f"data file {path} is not UTF-8 text{where} (Latin-1 and Windows-1252 text have such bytes)",
        fix=f"re-encode it as UTF-8, e.g. `iconv -f CP1252 -t UTF-8 {path} > {path.stem}-utf8{path.suffix}`",
    )


def _first_bad_byte(path: Path) -> tuple[int, int, int, int] | None:
    """``(offset, line, column, byte)`` of the first byte of ``path`` that UTF-8 does not decode
    (line and column count from 1, the column in bytes); None when every byte decodes."""
    lines, line_start, base, carry = 0, 0, 0, b""
    with path.open("rb") as f:
        while data := carry + (chunk := f.read(1 << 20)):
            try:
                data.decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as e:
                good = e.start
                if not (chunk and e.reason == "unexpected end of data"):  # not a character cut by the read
                    prefix = data[:good]
                    newline = prefix.rfind(b"\n")
                    start = base + newline + 1 if newline >= 0 else line_start
                    return base + good, lines + prefix.count(b"\n") + 1, base + good - start + 1, data[good]
            done = data[:good]
            lines += done.count(b"\n")
            if (newline := done.rfind(b"\n")) >= 0:
                line_start = base + newline + 1
            base, carry = base + good, data[good:]
    return None


def scan(path: Path) -> tuple[Kind, np.ndarray, list[Problem]]:
    """Find every element of ``path``: a JSON list when its first character is ``[``, else JSONL.

    Raises UnicodeDecodeError when the file is not UTF-8."""
    with path.open("rb") as f:
        skip = len(BOM) if f.read(len(BOM)) == BOM else 0
        f.seek(skip)
        while (chunk := f.read(1 << 16)) and not chunk.lstrip(WHITESPACE):
            pass
        if b"\x00" in chunk.lstrip(WHITESPACE)[:4]:  # UTF-16/32 without a byte-order mark; never JSON
            raise UnicodeDecodeError("utf-8", chunk, 0, 1, "NUL bytes among the first characters")
        if not chunk.lstrip(WHITESPACE).startswith(b"["):
            if chunk.lstrip(WHITESPACE).split(b"\n", 1)[0].strip() == b"{":
                # JSONL holds a record a line; a first line of `{` alone is an object spread over lines.
                spread = "the file is one JSON object spread over lines (its first line is `{`), not a list of records"
                return "jsonl", np.zeros((0, 4), np.int64), [Problem("bad_json", f"{spread} or JSONL")]
            f.seek(skip)
            return "jsonl", _scan_jsonl(f), []
    try:
        return "list", _scan_list(path, skip), []
    except _BadList:
        return "list", np.zeros((0, 4), np.int64), [_list_problem(path)]


def _scan_jsonl(f: Any) -> np.ndarray:
    """One element a line that is not blank; a line's bytes go to no JSON decoder here."""
    rows = []
    position = f.tell()
    decoder = codecs.getincrementaldecoder("utf-8")()
    for lineno, line in enumerate(f, start=1):
        decoder.decode(line)
        if line.strip(WHITESPACE):
            end = position + len(line.rstrip(b"\r\n"))
            rows.append((position, end, lineno, _IMAGE_KEY_LINE.search(line) is not None))
        position += len(line)
    decoder.decode(b"", final=True)
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def _scan_list(path: Path, skip: int) -> np.ndarray:
    """The elements of a JSON list, from its bytes: a comma at depth 1, outside strings, ends one.

    Per chunk: the quotes that are not escaped (a quote after an odd run of backslashes is), whose
    running count says whether a position is inside a string; the brackets and commas outside
    strings; the depth at each comma from the counts of brackets before it. Raises :class:`_BadList`
    where that structure does not hold; what it does not see (a bad value inside an element) is
    found when the element is decoded."""
    size = path.stat().st_size
    buf = bytearray(CHUNK_BYTES + OVERLAP_BYTES)
    decoder = codecs.getincrementaldecoder("utf-8")()
    seps: list[np.ndarray] = []  # the list's `[`, then the commas between its elements
    seps_line: list[np.ndarray] = []
    images: list[np.ndarray] = []
    offset, depth, quotes, newlines, backslashes = skip, 0, 0, 0, 0
    end, opening = None, True
    with path.open("rb", buffering=0) as f:
        fd = f.fileno()
        while offset < size and end is None:
            got = os.preadv(fd, [buf], offset)
            n = min(got, CHUNK_BYTES)
            decoder.decode(memoryview(buf)[:n])
            c = np.frombuffer(buf, np.uint8, got)
            # One pass over the bytes (a table lookup) for the quotes, brackets, commas and newlines.
            at = np.flatnonzero(np.frombuffer(buf.translate(_LOOKED_AT), bool, n))
            v = c[at]
            newline = v == _NEWLINE
            lines, at, v = at[newline], at[~newline], v[~newline]
            quote = v == _QUOTE
            escaped = _escaped_quotes(buf, at[quote], backslashes)
            if escaped:
                quote[np.searchsorted(at, escaped)] = False
            backslashes = _backslashes_before(buf, n, backslashes)
            quotes_at = at[quote]
            # Outside strings after an even number of quotes; a quote is no bracket or comma.
            outside = np.flatnonzero(((np.cumsum(quote, dtype=np.int64) + quotes) & 1) == 0)
            structural, sv = at[outside], v[outside] | 0x20
            step = (sv == _OPEN).astype(np.int8) - (sv == _CLOSE)
            level = np.cumsum(step, dtype=np.int64) + depth  # the depth after each, the list's `[` counted
            sep = (sv == _COMMA | 0x20) & (level == 1)
            if opening and len(sep):
                sep[0], opening = True, False  # the list's `[` opens the first element
            closing = np.flatnonzero((step == -1) & (level == 0))
            if len(closing):
                last = int(closing[0])
                if c[structural[last]] != ord("]"):
                    raise _BadList  # `[1}`
                sep[last:] = False
                end = int(structural[last])
            mine = structural[sep]
            seps.append(mine + offset)
            seps_line.append(np.searchsorted(lines, mine) + newlines + 1)
            keys = _image_keys(c, quotes_at, quotes)
            images.append((keys if end is None else keys[keys < end]) + offset)
            depth = int(level[-1]) if len(level) else depth
            quotes += len(quotes_at)
            newlines += len(lines)
            if end is not None:
                end += offset
            offset += n
        if end is None:
            raise _BadList  # unterminated
        decoder.decode(b"", final=True)
        if os.pread(fd, size - end - 1, end + 1).strip(WHITESPACE):
            raise _BadList  # something after the list
        bounds = np.concatenate(seps)
        starts, ends = bounds + 1, np.append(bounds[1:], end)
        blank = [
            k
            for k in np.flatnonzero(ends - starts < 32).tolist()
            if not os.pread(fd, int(ends[k] - starts[k]), int(starts[k])).strip(WHITESPACE)
        ]
    if blank == [0] and len(bounds) == 1:
        return np.zeros((0, 4), dtype=np.int64)  # `[]`
    if blank:
        raise _BadList  # `[1,,2]`, `[1,]`, `[,1]`
    index = np.zeros((len(starts), 4), dtype=np.int64)
    index[:, START], index[:, END], index[:, LINE] = starts, ends, np.concatenate(seps_line)
    index[np.searchsorted(bounds, np.concatenate(images), "right") - 1, IMAGE] = 1
    return index


def _image_keys(c: np.ndarray, quotes_at: np.ndarray, carried: int) -> np.ndarray:
    """Where an `"image"` key starts among the chunk's unescaped quotes ``quotes_at`` (``carried``
    quotes before the chunk): a quote that opens a string, ``image"`` after it, then a colon or
    white space. ``c`` holds the chunk's bytes and the overlap after it."""
    opening = quotes_at[((np.arange(len(quotes_at)) + carried) & 1) == 0]
    keys = opening[opening + len(_IMAGE_KEY) < len(c)]
    for k, byte in enumerate(_IMAGE_KEY[1:], start=1):
        keys = keys[c[keys + k] == byte]
    return keys[np.isin(c[keys + len(_IMAGE_KEY)], _AFTER_KEY)]


def _escaped_quotes(buf: bytearray, quotes: np.ndarray, carried: int) -> list[int]:
    """The ``quotes`` of the chunk in ``buf`` that a backslash escapes (``carried``: the backslashes
    that end the chunk before)."""
    inner = quotes[quotes > 0]
    maybe = inner[np.frombuffer(buf, np.uint8)[inner - 1] == _BACKSLASH].tolist()
    if len(quotes) and quotes[0] == 0 and carried:
        maybe.insert(0, 0)
    return [p for p in maybe if _backslashes_before(buf, p, carried) % 2]


def _backslashes_before(buf: bytearray, p: int, carried: int) -> int:
    """The run of backslashes that ends just before position ``p`` of the chunk."""
    k = p - 1
    while k >= 0 and buf[k] == _BACKSLASH:
        k -= 1
    return p - 1 - k + (carried if k < 0 else 0)
