"""Every record's exact token counts, computed once for a data file and the way it is tokenized.

For a data file (its fingerprint), a tokenizer, a template, an image size and ``data.max_seq_len``,
each record's length (image tokens included, before the cut), its supervised tokens (after the
cut), the supervised tokens the cut loses, its number of images, or the problem that keeps it from
training. ``data check`` computes them (over ``--workers`` processes) and keeps them in
``$LLAVACTL_CACHE/lengths/``; a later ``data check``, the planner and the dataset's length grouping
read them back. Any change to one of the inputs names another file, so nothing stale is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llavactl.data.cache import cache_root, keep
from llavactl.data.records import Record, RecordProblem, RecordSource
from llavactl.data.templates import encoder_for, prepare

if TYPE_CHECKING:
    from llavactl.data.tokens import TokenContext

# Bump when what is counted changes (a template's rendering, the cut): old files are never read.
LENGTHS_VERSION = 1
# The length of a record that does not build (its structure, or a token problem).
UNBUILT = -1


@dataclass(frozen=True)
class TokenCounts:
    """Per-record arrays (``UNBUILT`` where a record does not build) and the token problems by index."""

    full: np.ndarray
    supervised: np.ndarray
    cut: np.ndarray
    images: np.ndarray
    problems: dict[int, tuple[str, str]]  # index -> (code, message), from :func:`prepare`

    def built(self) -> np.ndarray:
        return self.full != UNBUILT


def counts_path(store: RecordSource, tokens: TokenContext, template: str, max_seq_len: int) -> Path | None:
    """Where these counts live, or None for a store without a fingerprint (a file scanned, not opened)."""
    if store.key is None:
        return None
    key = repr(
        (
            LENGTHS_VERSION,
            store.key,
            _tokenizer_key(tokens.tokenizer),
            tokens.image_token_id,
            tokens.spec.num_tokens,
            tokens.spec.size,
            template,
            max_seq_len,
        )
    )
    return cache_root() / "lengths" / f"{store.key}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _tokenizer_key(tokenizer: Any) -> str:
    """What the tokenizer does, as text: a fast tokenizer's whole definition, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = (type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.chat_template)
    return hashlib.sha256((spec + repr(extra)).encode()).hexdigest()


def cached_counts(store: RecordSource, tokens: TokenContext, template: str, max_seq_len: int) -> TokenCounts | None:
    """The counts kept for exactly these inputs, or None."""
    path = counts_path(store, tokens, template, max_seq_len)
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as f:
            problems = {int(k): (c, m) for k, (c, m) in json.loads(str(f["problems"])).items()}
            counts = TokenCounts(f["full"], f["supervised"], f["cut"], f["images"], problems)
    except (OSError, ValueError, KeyError):
        return None
    return counts if len(counts.full) == len(store) else None


def token_counts(
    store: RecordSource, tokens: TokenContext, template: str, max_seq_len: int, *, workers: int = 1
) -> TokenCounts:
    """The counts of every record: the cached ones, or computed over ``workers`` processes and kept."""
    cached = cached_counts(store, tokens, template, max_seq_len)
    if cached is not None:
        return cached
    counts = count_records(store, tokens, template, max_seq_len, range(len(store)), workers=workers)
    return _kept(store, tokens, template, max_seq_len, counts, True)


@contextlib.contextmanager
def counting(
    store: RecordSource, tokens: TokenContext, template: str, max_seq_len: int, count: int, *, workers: int
) -> Iterator[Callable[[], TokenCounts]]:
    """Count the first ``count`` records while the caller does other work (``data check`` parses
    the records and checks their images meanwhile); yield the function that waits for the counts.
    The counts of all records are read back when kept, and kept when counted.

    With ``workers`` > 1 the ranges go to the worker processes at once (forked here, from the
    calling thread); leaving the block before the counts are asked for drops the ranges not yet
    started, and keeps nothing."""
    whole = count == len(store)
    if whole and (cached := cached_counts(store, tokens, template, max_seq_len)) is not None:
        yield lambda: cached
        return
    job, ranges = _ranges(store, tokens, template, max_seq_len, range(count), workers)
    if workers <= 1 or len(ranges) <= 1:
        yield lambda: _kept(
            store,
            tokens,
            template,
            max_seq_len,
            count_records(store, tokens, template, max_seq_len, range(count), workers=1),
            whole,
        )
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(ranges)), initializer=_start_worker, initargs=job) as pool:
        futures = [pool.submit(_count_range, r) for r in ranges]
        try:
            yield lambda: _kept(store, tokens, template, max_seq_len, _merged([f.result() for f in futures]), whole)
        finally:
            pool.shutdown(cancel_futures=True)


def _kept(
    store: RecordSource, tokens: TokenContext, template: str, max_seq_len: int, counts: TokenCounts, whole: bool
) -> TokenCounts:
    path = counts_path(store, tokens, template, max_seq_len) if whole else None
    if path is not None:
        _save(path, counts)
    return counts


def count_records(
    store: RecordSource, tokens: TokenContext, template: str, max_seq_len: int, indices: range, *, workers: int = 1
) -> TokenCounts:
    """The counts of the records ``indices``, each decoded, rendered and tokenized as training does."""
    job, ranges = _ranges(store, tokens, template, max_seq_len, indices, workers)
    if workers > 1 and len(ranges) > 1:
        with ProcessPoolExecutor(
            max_workers=min(workers, len(ranges)), initializer=_start_worker, initargs=job
        ) as pool:
            return _merged(list(pool.map(_count_range, ranges)))
    _start_worker(*job)
    return _merged([_count_range(r) for r in ranges])


def _ranges(
    store: RecordSource, tokens: TokenContext, template: str, max_seq_len: int, indices: range, workers: int
) -> tuple[tuple[Any, ...], list[range]]:
    """What a worker starts with, and ``indices`` cut into a few ranges a worker (so that one slow
    range does not hold the rest back)."""
    job = (store, tokens.tokenizer, tokens.image_token_id, tokens.spec.num_tokens, template, max_seq_len)
    size = max(1, -(-len(indices) // (4 * workers)))
    return job, [indices[k : k + size] for k in range(0, len(indices), size)]


def _merged(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, tuple[str, str]]]],
) -> TokenCounts:
    problems: dict[int, tuple[str, str]] = {}
    for part in parts:
        problems.update(part[4])
    columns = [np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.int32) for k in range(4)]
    return TokenCounts(*columns, problems)


_worker: dict[str, Any] = {}


def _start_worker(
    store: RecordSource, tokenizer: Any, image_token_id: int, num_image_tokens: int, template: str, max_seq_len: int
) -> None:
    _worker.update(
        store=store,
        encoder=encoder_for(tokenizer, image_token_id, num_image_tokens, template),
        template=template,
        max_seq_len=max_seq_len,
    )


def _count_range(indices: range) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[int, tuple[str, str]]]:
    store: RecordSource = _worker["store"]
    template, max_seq_len, encoder = _worker["template"], _worker["max_seq_len"], _worker["encoder"]
    out = np.full((4, len(indices)), UNBUILT, dtype=np.int32)
    problems: dict[int, tuple[str, str]] = {}
    for k, record in enumerate(store.parsed(indices)):
        if not isinstance(record, Record):
            continue  # its structure is the problem: reported where structure is checked
        out[3, k] = len(record.images)
        try:
            prepared = prepare(record, template, encoder, max_seq_len)
        except RecordProblem as e:
            problems[record.index] = (e.code, e.message)
            continue
        out[0, k], out[1, k], out[2, k] = prepared.full_length, prepared.encoded.num_supervised, prepared.supervised_cut
    return out[0], out[1], out[2], out[3], problems


def _save(path: Path, counts: TokenCounts) -> None:
    problems = json.dumps({str(k): v for k, v in counts.problems.items()})
    keep(
        path,
        full=counts.full,
        supervised=counts.supervised,
        cut=counts.cut,
        images=counts.images,
        problems=np.array(problems),
    )
