"""Several data sources as one data set: a mixture file, as LLaVA-NeXT and lmms-engine describe them.

``data.data_path`` may name a YAML file (``.yaml``/``.yml``) that lists the sources::

    seed: 0                             # random sampling draws with this seed (default: the profile's)
    datasets:
      - json_path: llava_v1_5_mix665k.json    # or `path`/`data_path`: JSON, JSONL or Parquet shards
        sampling_strategy: "all"              # all | first:N | first:P% | end:N | end:P% | random:N | random:P%
      - json_path: sharegpt4v.json
        image_folder: sharegpt4v/images       # optional: this source's own image root
        sampling_strategy: "random:50%"

Paths are relative to the YAML file's folder. A source without its own ``image_folder`` takes
``data.image_folder`` (as LLaVA-NeXT's one ``--image_folder``); one with it has its records' image
paths made absolute under it. The selection is fixed by the file and the seed (its own, else the
profile's ``seed``), so every command and every rank sees the same records; each source keeps its
order (random picks are kept in file order), and the sources follow each other as listed.
:class:`MixtureStore` is a :class:`~llavactl.data.records.RecordSource`, so everything that reads
data reads a mixture, and counts what it took from each source. Its sources are opened by the one
entry, :mod:`llavactl.data.source`, which hands :func:`open_mixture` its opener.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llavactl.data.records import Parts, Problem, RawRecord, Record, RecordSource, parse_each, require_records
from llavactl.errors import DataError, excerpt

SUFFIXES = (".yaml", ".yml")
_STRATEGY = re.compile(r"^(all|(first|end|random):(\d+)(%?))$")
PATH_KEYS = ("json_path", "path", "data_path")


def is_mixture(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES and path.is_file()


@dataclass(frozen=True)
class Source:
    """One listed source and what the mixture takes of it."""

    path: Path
    image_folder: Path | None
    strategy: str
    indices: np.ndarray  # the source's records taken, in its order

    def describe(self, total: int) -> str:
        return f"{self.path.name} {len(self.indices):,} of {total:,} ({self.strategy})"


def select(strategy: str, count: int, rng: random.Random, where: str) -> np.ndarray:
    """The records of a source of ``count`` that ``strategy`` takes (LLaVA-NeXT's forms)."""
    match = _STRATEGY.match(strategy.strip())
    if not match:
        raise DataError(
            f"{where}: sampling_strategy {excerpt(strategy)} is not one of all, first:N, first:P%, end:N, end:P%, "
            "random:N, random:P%",
            fix='write e.g. `sampling_strategy: "first:10%"` or `"random:5000"`',
        )
    if match.group(1) == "all":
        return np.arange(count)
    how, number, percent = match.group(2), int(match.group(3)), match.group(4) == "%"
    if percent and number > 100:
        raise DataError(f"{where}: sampling_strategy {excerpt(strategy)} takes over 100%", fix="use at most 100%")
    n = min(count, math.ceil(count * number / 100) if percent else number)
    if how == "first":
        return np.arange(n)
    if how == "end":
        return np.arange(count - n, count)
    return np.sort(np.asarray(rng.sample(range(count), n), dtype=np.int64))


class MixtureStore:
    """The records of several stores, as one :class:`~llavactl.data.records.RecordSource`."""

    kind = "mixture"

    def __init__(self, path: Path, stores: list[RecordSource], sources: list[Source], key: str | None) -> None:
        self.path = path
        self.key = key
        self.problems: list[Problem] = []
        self.stores = stores
        self.sources = sources
        self._parts = Parts(len(s.indices) for s in sources)

    def __len__(self) -> int:
        return len(self._parts)

    def _locate(self, i: int) -> tuple[int, int]:
        k, j = self._parts.locate(i)
        return k, int(self.sources[k].indices[j])

    def files(self) -> list[Path]:
        """The mixture file and every source's files (what no output may overwrite)."""
        return [self.path, *(f for store in self.stores for f in store.files())]

    def where(self, i: int) -> str:
        """How messages name record ``i``: its source and its place there."""
        k, j = self._locate(i)
        inner = self.stores[k].where(j)
        return f"{self.sources[k].path.name} record {j}" + (f" ({inner})" if inner else "")

    def raw(self, i: int) -> RawRecord:
        k, j = self._locate(i)
        raw = self.stores[k].raw(j)
        folder, value = self.sources[k].image_folder, raw.value
        if folder is not None and isinstance(value, dict) and value.get("image") is not None:
            image = value["image"]
            under = [_under(folder, p) for p in image] if isinstance(image, list) else _under(folder, image)
            value = {**value, "image": under}
        return RawRecord(i, raw.line, value)

    def parsed(self, indices: Iterable[int] | None = None) -> Iterator[Record | Problem]:
        return parse_each(self, indices)

    def __iter__(self) -> Iterator[RawRecord]:
        return (self.raw(i) for i in range(len(self)))

    def _pairs(self) -> Iterator[tuple[RecordSource, Source]]:
        return zip(self.stores, self.sources, strict=True)

    def has_image(self) -> np.ndarray:
        return np.concatenate([np.asarray(st.has_image())[s.indices] for st, s in self._pairs()])

    def sizes(self) -> np.ndarray:
        return np.concatenate([np.asarray(st.sizes())[s.indices] for st, s in self._pairs()])

    def counts(self) -> list[dict[str, Any]]:
        """Per source: its path, strategy, records taken and records it has."""
        return [
            {"path": str(s.path), "sampling": s.strategy, "records": len(s.indices), "of": len(st)}
            for st, s in self._pairs()
        ]

    def describe(self) -> str:
        return "; ".join(s.describe(len(st)) for st, s in self._pairs())


def _under(folder: Path, image: Any) -> Any:
    return str(folder / image) if isinstance(image, str) and image else image


def open_mixture(path: Path, seed: int, open_source: Callable[[Path], RecordSource]) -> MixtureStore:
    """The mixture that the YAML file ``path`` describes, each source opened by ``open_source``;
    random picks draw with its ``seed``, else with ``seed`` (the profile's)."""
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"mixture file {path} cannot be read as YAML ({e})", fix="fix the file") from None
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(
            f"mixture file {path} lists no sources",
            fix="give it a `datasets:` list of entries with `json_path` (and `sampling_strategy`)",
        )
    _known_keys(spec, ("datasets", "seed"), f"mixture file {path}")
    seed = spec.get("seed", seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"mixture file {path}: `seed` must be an integer, got {excerpt(seed)}", fix="e.g. `seed: 0`")
    stores, sources, keys = [], [], []
    for n, entry in enumerate(entries):
        store, source = _source(path, n, entry, seed, open_source)
        stores.append(store)
        sources.append(source)
        keys.append(None if store.key is None else f"{store.key}:{source.strategy}:{source.image_folder}")
    key = None
    if all(k is not None for k in keys):
        key = hashlib.sha256(repr((str(path.resolve()), seed, keys)).encode()).hexdigest()[:32]
    return MixtureStore(path, stores, sources, key)


def _source(
    path: Path, n: int, entry: Any, seed: int, open_source: Callable[[Path], RecordSource]
) -> tuple[RecordSource, Source]:
    """Entry ``n`` of the mixture file ``path``: its store, and what the mixture takes of it."""
    where = f"{path} datasets[{n}]"
    if not isinstance(entry, dict):
        raise DataError(
            f"{where} is {excerpt(entry)}, not an entry", fix="write it as `- json_path: FILE` (and its other keys)"
        )
    _known_keys(entry, (*PATH_KEYS, "image_folder", "sampling_strategy"), where)
    named = [k for k in PATH_KEYS if k in entry]
    if len(named) > 1:
        raise DataError(
            f"{where} names its data file twice ({', '.join(named)})", fix=f"keep one of {', '.join(named)}"
        )
    given = entry.get(named[0]) if named else None
    if not (isinstance(given, str) and given):
        raise DataError(f"{where} names no data file", fix="give it `json_path: FILE` (JSON, JSONL or shards)")
    file = path.parent / Path(given).expanduser()
    if not file.exists():
        raise DataError(
            f"{where}: {named[0]} {file} does not exist",
            fix=f"fix the path in {path.name} (a relative path starts at the mixture file's folder, {path.parent})",
        )
    if is_mixture(file):
        raise DataError(f"{where}: {file} is itself a mixture", fix="list its sources here instead")
    folder = entry.get("image_folder")
    if folder is not None and not (isinstance(folder, str) and folder):
        raise DataError(f"{where}: image_folder must be a path, got {excerpt(folder)}", fix="write it as a folder path")
    image_folder = path.parent / Path(folder).expanduser() if isinstance(folder, str) and folder else None
    if image_folder is not None and not image_folder.is_dir():
        raise DataError(f"{where}: image_folder {image_folder} is not a folder", fix="fix the path")
    strategy = entry.get("sampling_strategy", "all")
    if not isinstance(strategy, str):
        raise DataError(
            f'{where}: sampling_strategy must be text such as "first:10%", got {excerpt(strategy)}',
            fix='write e.g. `sampling_strategy: "first:10%"` or `"random:5000"`',
        )
    store = open_source(file)
    require_records(store, f"{where}: {file}", empty_fix="point the entry at the file that holds them, or drop it")
    taken = select(strategy, len(store), random.Random(f"{seed}:{n}:{given}"), where)
    if len(taken) == 0:
        raise DataError(
            f"{where}: sampling_strategy {strategy!r} takes none of the {len(store):,} records of {file.name}",
            fix="take at least one record, or drop the entry",
        )
    return store, Source(file, image_folder, strategy, taken)


def _known_keys(mapping: dict[Any, Any], known: tuple[str, ...], where: str) -> None:
    """Refuse a key the mixture does not read: a misspelt `sampling_strategy` would take everything."""
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6) if len(str(key)) < 100 else []
            raise DataError(
                f"{where}: unknown key {excerpt(key)}",
                fix=f"did you mean `{close[0]}`?" if close else f"the keys read here are {', '.join(known)}",
            )
