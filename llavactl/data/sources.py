"""Resolve ``data.data_path`` (a file or ``builtin:shapes``) to a records file and image folder.

``builtin:shapes`` (and its held-out twin ``builtin:shapes-eval``) is generated on first use into
the cache (``$LLAVACTL_CACHE`` or ``~/.cache/llavactl``), under a folder named by its parameters,
and written to a temporary folder renamed into place so that an interrupted or concurrent run
never leaves half a data set.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from llavactl.data import synth
from llavactl.errors import DataError

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("shapes", "shapes-eval")
# The held-out shapes set: other seeds, so its images are not the training images.
EVAL_SEED_OFFSET = 1 << 32
EVAL_COUNT = 200


def cache_root() -> Path:
    return Path(os.environ.get("LLAVACTL_CACHE") or Path.home() / ".cache" / "llavactl")


def resolve_data_source(data_path: str, image_folder: str | None, seed: int) -> tuple[Path, Path]:
    """The records (a file, or Parquet/Arrow shards: see :mod:`llavactl.data.parquet`) and the
    folder that their image paths are relative to.

    ``image_folder`` defaults to the file's own folder (a folder of shards: that folder).
    """
    if data_path.startswith(BUILTIN_PREFIX):
        name = data_path[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise DataError(
                f"data.data_path: unknown builtin data set {data_path!r}",
                fix="use `builtin:shapes` (`builtin:shapes-eval` for held-out records) or a path to a JSON/JSONL file",
            )
        if name == "shapes-eval":
            records = shapes_dataset(seed + EVAL_SEED_OFFSET, n=EVAL_COUNT)
        else:
            records = shapes_dataset(seed)
        return records, records.parent
    from llavactl.data.parquet import hub_snapshot, is_shards, shard_files

    path = Path(data_path).expanduser()
    if not path.exists() and (snapshot := hub_snapshot(data_path)) is not None:
        path = snapshot
    if is_shards(path):
        shard_files(path)  # raises when it names none
    elif not path.is_file():
        raise DataError(
            f"data.data_path: {path} is not a file",
            fix="set `data.data_path` to a LLaVA JSON or JSONL file, Parquet shards (a folder or a glob), "
            "a Hub data set in the HF cache (`ORG/NAME`), or `builtin:shapes`",
        )
    folder = Path(image_folder).expanduser() if image_folder else (path if path.is_dir() else _first_dir(path))
    if not folder.is_dir():
        raise DataError(
            f"data.image_folder: {folder} is not a folder", fix="set `data.image_folder` to the images' root folder"
        )
    return path, folder


def _first_dir(path: Path) -> Path:
    """The folder of a file, or of a glob's fixed part (``data/*/train-*.parquet``: ``data``)."""
    import glob

    parts = path.parts
    fixed = next((k for k, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
    return Path(*parts[:fixed]) if fixed else Path(".")


def shapes_dataset(seed: int, n: int = synth.DEFAULT_COUNT, image_size: int = synth.DEFAULT_IMAGE_SIZE) -> Path:
    """The cached shapes records file for these parameters, generated when absent."""
    key = hashlib.sha256(f"shapes-v3 n={n} seed={seed} size={image_size}".encode()).hexdigest()[:16]
    final = cache_root() / "shapes" / key
    records = final / synth.RECORDS_FILE
    if records.is_file():
        return records
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        synth.write_shapes(tmp, n=n, seed=seed, image_size=image_size)
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished the same data set first; its copy is identical.
            if not records.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return records
