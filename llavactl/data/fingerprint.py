"""The data's fingerprint: what a resume compares to know it reads the data its checkpoint was saved with.

Cheap, so that it is computed once when a run opens its data, never at a checkpoint save: each file
of the data (a JSON/JSONL file, every shard, a mixture's YAML and every file of its sources) by its
resolved path, size, modification time and a hash of its first and last MiB; a builtin data set by its
name and parameters (it is generated from them). A comparison says what changed, file by file.

A checkpoint of an older llavactl holds one string: ``sha256:...`` of the whole file ``data.data_path``
named (a JSON file or a mixture's YAML), else that path itself (shards, a Hub data set, builtin data).
It is compared on what it recorded: the whole file is hashed once, at that resume, or the path compared.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavactl.data.cache import file_stamp
from llavactl.system import file_sha256

VERSION = 2
EDGE_BYTES = 1 << 20
# What a part records, and how a message names it when it differs.
_FIELDS = (
    ("size", "size"),
    ("mtime_ns", "mtime"),
    ("sha256", "content"),
    ("seed", "seed"),
    ("count", "count"),
    ("image_size", "image size"),
)


@dataclass(frozen=True)
class Fingerprint:
    """``parts``: per file (its resolved path) or builtin data set (its name), what it is (``what``,
    e.g. ``shard``) and what identifies its content. ``file``: the one file ``data_path`` names, if it
    names one (what an older checkpoint's whole-file hash is compared with)."""

    data_path: str
    parts: dict[str, dict[str, Any]]
    file: Path | None = field(default=None, compare=False)

    def as_json(self) -> dict[str, Any]:
        """What a checkpoint keeps of it."""
        return {"version": VERSION, "data_path": self.data_path, "parts": self.parts}

    def changes_since(self, saved: object) -> list[str]:
        """One line per part that differs from ``saved`` (a checkpoint's :meth:`as_json`, or an older
        llavactl's string), naming the part and what of it changed."""
        if isinstance(saved, str):
            return self._since_old(saved)
        parts = saved.get("parts") if isinstance(saved, dict) else None
        if not isinstance(parts, dict) or not all(isinstance(p, dict) for p in parts.values()):
            return [f"data: the checkpoint's data fingerprint cannot be read ({str(saved)[:60]!r})"]
        lines = []
        for key in [*self.parts, *(k for k in parts if k not in self.parts)]:
            before, after = parts.get(key), self.parts.get(key)
            if before == after:
                continue
            if before is None:
                lines.append(f"data: {_named(key, after)} is new since the checkpoint")
            elif after is None:
                lines.append(f"data: {_named(key, before)} of the checkpoint's data is gone")
            else:
                changed = [label for name, label in _FIELDS if before.get(name) != after.get(name)] or ["kind"]
                lines.append(f"data: {_named(key, after)} changed ({'/'.join(changed)})")
        return lines

    def _since_old(self, saved: str) -> list[str]:
        if not saved.startswith("sha256:"):
            same = saved == self.data_path
            return [] if same else [f"data: the checkpoint read {saved!r}, this run reads {self.data_path!r}"]
        if self.file is None:
            return [f"data: the checkpoint read one file ({saved[:19]}...), this run reads {self.data_path!r}"]
        if f"sha256:{file_sha256(self.file)}" == saved:
            return []
        return [f"data: file {self.file.name} changed (content)"]


def _named(key: str, part: dict[str, Any]) -> str:
    return f"{part.get('what', 'file')} {part.get('name', key)}"


def of_files(data_path: str, files: list[tuple[str, Path]], named_file: Path | None) -> Fingerprint:
    """The fingerprint of data read from ``files`` (each with what it is: ``file``, ``shard``, ...)."""
    parts = {}
    for what, path in files:
        resolved = path.resolve()
        stamp = file_stamp(resolved.stat())
        parts[str(resolved)] = {
            "what": what,
            "name": resolved.name,
            "size": stamp[0],
            "mtime_ns": stamp[1],
            "sha256": _edges_digest(resolved, stamp),
        }
    return Fingerprint(data_path, parts, named_file)


def of_builtin(data_path: str, **parameters: int) -> Fingerprint:
    """The fingerprint of a builtin data set, generated from its name and ``parameters``."""
    return Fingerprint(data_path, {data_path: {"what": "builtin data set", "name": data_path, **parameters}})


# A command opens its data more than once (doctor, planner, dataset): each file is read once while unchanged.
@functools.lru_cache(maxsize=256)
def _edges_digest(path: Path, stamp: tuple[int, ...]) -> str:
    """The hash of the first and last MiB of ``path`` (all of it when smaller than two)."""
    digest = hashlib.sha256()
    size = stamp[0]
    with path.open("rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()
