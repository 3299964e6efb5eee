"""``data convert``: a data set as Parquet shards with its images embedded, or back as JSONL.

Parquet shards are what the Hub ships and what moves to a cluster as a few files: each row holds
``id``, ``conversations`` (LLaVA's layout) and the images as ``datasets``' ``Image`` feature writes
them (``{"bytes", "path"}``: ``image`` for one, ``images`` when some record has several). JSONL
goes back to a records file beside a folder of image files. Every file is written under a
temporary name and renamed into place, so that an interrupted convert leaves no half shard.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from llavactl.data.images import DEFAULT_LIMITS, ImageFileError, ImageLimits, describe, probe, require_file
from llavactl.data.records import (
    Problem,
    Record,
    RecordProblem,
    RecordSource,
    check_image_markers,
    require_records,
)
from llavactl.data.shard_layout import DEFAULT_SHARD_RECORDS, ROW_GROUP_RECORDS
from llavactl.data.synth import check_out_dir
from llavactl.errors import DataError

Target = Literal["parquet", "jsonl"]
JSONL_FILE = "records.jsonl"


def convert(
    records: Path | RecordSource,
    image_folder: Path,
    to: Target,
    out_dir: Path,
    *,
    shard_records: int = DEFAULT_SHARD_RECORDS,
    force: bool = False,
    seed: int = 0,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> list[Path]:
    """Write the records of ``records`` (any source :func:`open_records` reads; ``seed``, the
    profile's, for a mixture's random picks) to ``out_dir`` as Parquet shards or JSONL; return the
    files written. Every record must be valid, its `<image>` markers matching its images and each
    image's header readable and within ``limits`` (the first bad one is named: `data check
    --write-clean` drops them first). Tokenization is not checked: it depends on the model."""
    check_out_dir(out_dir, force)
    valid = list(_valid(records, image_folder, seed, limits))
    out_dir.mkdir(parents=True, exist_ok=True)
    if to == "parquet":
        return _to_parquet(valid, image_folder, out_dir, shard_records)
    return [_to_jsonl(valid, image_folder, out_dir)]


def _valid(records: Path | RecordSource, image_folder: Path, seed: int, limits: ImageLimits) -> Iterator[Record]:
    from llavactl.data.source import records_of

    store = records_of(records, seed)
    require_records(store, str(store.path))
    for parsed in store.parsed():
        problem = _image_problem(parsed, image_folder, limits) if isinstance(parsed, Record) else parsed
        if problem is None:
            yield parsed
            continue
        where = store.where(problem.index) if problem.index is not None else None
        raise DataError(
            f"record {problem.index} (id {problem.id!r}{', ' + where if where else ''}): {problem.code}: "
            f"{problem.message}",
            fix="drop the bad records first: `llavactl data check --write-clean FILE` writes the others",
        )


def _image_problem(record: Record, image_folder: Path, limits: ImageLimits) -> Problem | None:
    """What keeps ``record``'s images out of a shard: markers that do not match them, or an image
    that is missing, not a file, without a readable header or over ``limits``."""
    try:
        check_image_markers(record)
        for name in record.images:
            probe(image_folder / name, limits)
    except (RecordProblem, ImageFileError) as e:
        return Problem(e.code, e.message, record.index, record.id)
    return None


def _image_bytes(image_folder: Path, name: str) -> bytes:
    from llavactl.data.parquet import embedded_bytes, parse_ref

    path = image_folder / name
    ref = parse_ref(path)
    try:
        if ref is not None:
            return embedded_bytes(*ref)
        require_file(path)  # checked by `_valid` already; a file swapped since for a pipe would block
        return path.read_bytes()
    except OSError as e:
        raise DataError(
            f"{describe(path)} cannot be read ({e.strerror or 'missing'})",
            fix="run `llavactl data check` to find every missing image",
        ) from None


def _row_image(image_folder: Path, name: str) -> dict[str, Any]:
    from llavactl.data.parquet import parse_ref

    stored = name if parse_ref(image_folder / name) is None else None
    return {"bytes": _image_bytes(image_folder, name), "path": stored}


def _to_parquet(records: list[Record], image_folder: Path, out_dir: Path, shard_records: int) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    several = any(len(r.images) > 1 for r in records)
    ids = [r.id for r in records]
    # One Arrow type for the column: integers when every id is one, else text.
    text_ids = not all(isinstance(i, int) or i is None for i in ids)
    schema = pa.schema(
        [
            ("id", pa.string() if text_ids else pa.int64()),
            ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
            ("images", pa.list_(image)) if several else ("image", image),
        ]
    )
    n_shards = max(1, -(-len(records) // shard_records))
    written = []
    for s in range(n_shards):
        chunk = records[s * shard_records : (s + 1) * shard_records]
        rows = {
            "id": [None if r.id is None else str(r.id) if text_ids else r.id for r in chunk],
            "conversations": [[{"from": t.role, "value": t.text} for t in r.turns] for r in chunk],
        }
        if several:
            rows["images"] = [[_row_image(image_folder, p) for p in r.images] for r in chunk]
        else:
            rows["image"] = [_row_image(image_folder, r.images[0]) if r.images else None for r in chunk]
        target = out_dir / f"train-{s:05d}-of-{n_shards:05d}.parquet"
        table = pa.Table.from_pydict(rows, schema=schema)
        _atomic(target, lambda f, t=table: pq.write_table(t, f, row_group_size=ROW_GROUP_RECORDS))
        written.append(target)
    return written


def _to_jsonl(records: list[Record], image_folder: Path, out_dir: Path) -> Path:
    """Records beside their images; an embedded image without a usable path gets a name of its own."""
    from llavactl.data.parquet import parse_ref

    taken: set[str] = set()
    lines = []
    for r in records:
        names = []
        for k, p in enumerate(r.images):
            data = _image_bytes(image_folder, p)
            ref = parse_ref(image_folder / p)
            name = p if ref is None else _embedded_name(ref, r.index, k, data)
            if not _safe(name) or name in taken:
                name = f"images/{r.index:08d}-{k}{Path(name).suffix}"
            taken.add(name)
            _atomic(out_dir / name, lambda f, d=data: f.write(d))
            names.append(name)
        value: dict[str, Any] = {} if r.id is None else {"id": r.id}
        if names:
            value["image"] = names[0] if len(names) == 1 else names
        value["conversations"] = [{"from": t.role, "value": t.text} for t in r.turns]
        lines.append(json.dumps(value, ensure_ascii=False) + "\n")
    target = out_dir / JSONL_FILE
    _atomic(target, lambda f: f.write("".join(lines).encode("utf-8")))
    return target


def _embedded_name(ref: tuple[Path, int, int], index: int, k: int, data: bytes) -> str:
    import io

    from PIL import Image

    from llavactl.data.parquet import stored_path

    name = stored_path(*ref)
    if name:
        return name
    try:
        kind = (Image.open(io.BytesIO(data)).format or "bin").lower()
    except Exception:  # an undecodable image is kept as it is, named by its bytes' kind
        kind = "bin"
    return f"images/{index:08d}-{k}.{'jpg' if kind == 'jpeg' else kind}"


def _safe(name: str) -> bool:
    """A relative path that stays under the output folder."""
    path = Path(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts


def _atomic(target: Path, write: Any) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise DataError(
            f"{target} cannot be written ({e.strerror or e})", fix="give an output folder you can write to"
        ) from None
