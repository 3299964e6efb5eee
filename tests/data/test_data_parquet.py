"""Parquet/Arrow shards as a data source: both Hub layouts, embedded images, `data check` naming the
shard and row, `data convert` both ways, and the same batches as JSON and JSONL give."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import byte_tokenizer, image_id, record, run_cli, train_recipe
from PIL import Image

from llavactl.config.schema import DataConfig
from llavactl.data.check import check_dataset
from llavactl.data.convert import convert
from llavactl.data.dataset import Collator, build_dataset
from llavactl.data.images import ImageSpec, open_rgb
from llavactl.data.source import open_data_path, open_records, open_source
from llavactl.data.tokens import TokenContext

SPEC = ImageSpec(32, 8, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def batch_of(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    tok = byte_tokenizer()
    config = DataConfig(data_path=str(path), image_folder=str(folder), max_seq_len=512)
    ds = build_dataset(open_source(config, 0), config, tok, image_id(tok), SPEC)
    return Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))])


def test_convert_writes_shards_that_read_back_as_the_same_records(shapes_data: Callable[..., Path], tmp_path: Path):
    source = shapes_data(10)
    shards = convert(source, source.parent, "parquet", tmp_path / "pq", shard_records=4)
    assert [p.name for p in shards] == [f"train-0000{k}-of-00003.parquet" for k in range(3)]
    store = open_records(tmp_path / "pq")
    original = json.loads(source.read_text())
    assert len(store) == 10 and store.where(5) == "train-00001-of-00003.parquet row 1"
    for i, value in enumerate(original):
        row = store.raw(i).value
        assert row["id"] == value["id"] and row["conversations"] == value["conversations"]
        assert row["image"].startswith(str(shards[i // 4]))  # embedded: a reference into the shard
        embedded = open_rgb(Path(row["image"]))
        assert embedded.tobytes() == open_rgb(source.parent / value["image"]).tobytes()


def test_hub_messages_layout_with_embedded_images_is_read(tmp_path: Path) -> None:
    # As `datasets` writes an Image feature and a chat `messages` column.
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    message = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    table = pa.table(
        {
            "messages": pa.array(
                [
                    [
                        {
                            "role": "user",
                            "content": [{"type": "image", "text": None}, {"type": "text", "text": "Hue?"}],
                        },
                        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                    ],
                    [
                        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
                    ],
                ],
                pa.list_(message),
            ),
            "images": pa.array([[{"bytes": png((255, 0, 0)), "path": "red.png"}], []], pa.list_(IMAGE)),
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    store = open_records(tmp_path / "data")
    first, second = (r for r in store.parsed())
    assert [(t.role, t.text) for t in first.turns] == [("human", "<image>\nHue?"), ("gpt", "Red.")]
    assert [t.role for t in second.turns] == ["system", "human", "gpt"] and second.images == ()
    assert open_rgb(Path(first.images[0])).getpixel((0, 0)) == (255, 0, 0)
    assert store.has_image().tolist() == [True, False]


def test_json_jsonl_and_parquet_give_identical_batches(shapes_data: Callable[..., Path], tmp_path: Path) -> None:
    source = shapes_data(6)
    lines = [json.dumps(v) for v in json.loads(source.read_text())]
    jsonl = tmp_path / "shapes.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    convert(source, source.parent, "parquet", tmp_path / "pq", shard_records=4)
    batches = [batch_of(source, source.parent), batch_of(jsonl, source.parent), batch_of(tmp_path / "pq", tmp_path)]
    for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
        assert torch.equal(batches[0][key], batches[1][key]) and torch.equal(batches[0][key], batches[2][key]), key


def test_round_trip_json_to_parquet_to_jsonl_keeps_the_records(shapes_data: Callable[..., Path], tmp_path: Path):
    source = shapes_data(6)
    convert(source, source.parent, "parquet", tmp_path / "pq", shard_records=4)
    [back] = convert(tmp_path / "pq", tmp_path / "pq", "jsonl", tmp_path / "back")
    original = json.loads(source.read_text())
    assert [json.loads(line) for line in back.read_text().splitlines()] == original
    for value in original:
        assert (tmp_path / "back" / value["image"]).read_bytes() == (source.parent / value["image"]).read_bytes()


def crafted_shards(folder: Path) -> Path:
    """One row per `data check` code a shard can hold (a shard has no `bad_json`), over two shards."""
    ok = {"bytes": png((1, 2, 3)), "path": "ok.png"}
    Image.new("RGB", (40, 30)).save(folder / "on-disk.png")
    rows = [
        record(("human", "<image>\nWhat is it?"), ("gpt", "A square."), rid="good", image=ok),
        {"id": "nofield", "conversations": [], "image": None},
        record(("gpt", "a"), ("human", "q"), rid="order"),
        record(("human", "<image><image>"), ("gpt", "a"), rid="two-markers", image=ok),
        record(("human", "q"), ("gpt", "a"), rid="lost", image={"bytes": None, "path": "gone.png"}),
        record(("human", "q"), ("gpt", "a"), rid="broken", image={"bytes": b"not a png", "path": "b.png"}),
        record(("human", " x" * 250), ("gpt", "a"), rid="no-room", image=ok),
        record(("human", "q"), ("gpt", " a" * 250), rid="long", image=ok),
        record(("human", "q"), ("gpt", "a"), rid="good", image={"bytes": None, "path": "on-disk.png"}),
    ]
    for row in rows:
        row.setdefault("image", None)
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
            ("image", IMAGE),
        ]
    )
    out = folder / "shards"
    out.mkdir()
    for k, part in enumerate((rows[:5], rows[5:])):
        pq.write_table(pa.Table.from_pylist(part, schema=schema), out / f"shard-0000{k}.parquet")
    return out


def test_data_check_on_shards_finds_every_code_and_names_shard_and_row(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    report, _ = check_dataset(
        crafted_shards(tmp_path), tmp_path, "vicuna_v1", 256, TokenContext(tok, image_id(tok), SPEC)
    )
    found = {(p.index, p.code): p.message for p in report.problems}
    assert set(found) == {
        (1, "missing_field"),
        (2, "bad_role"),
        (3, "image_token_mismatch"),
        (4, "missing_image"),
        (5, "corrupt_image"),
        (6, "empty_supervision"),
        (7, "too_long"),
        (8, "duplicate_id"),
    }
    assert found[2, "bad_role"].startswith("shard-00000.parquet row 2: ")
    assert found[4, "missing_image"].startswith("shard-00000.parquet row 4: image file ")
    assert "gone.png does not exist" in found[4, "missing_image"]
    assert found[5, "corrupt_image"].startswith("image 0 embedded in shard-00001.parquet row 0 has no readable")
    assert found[7, "too_long"].startswith("shard-00001.parquet row 2: ")
    assert report.records == 9 and report.bad_indices() == {1, 2, 3, 4, 5, 6}


def test_convert_refuses_a_folder_that_is_not_empty(shapes: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    args = ["data", "convert", "--profile", "tiny", f"data.data_path={shapes}", "--to", "parquet"]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "out")])
    assert code == 2 and "is not empty (it holds notes.txt)" in err
    code, _, _ = run_cli([*args, "--out", str(tmp_path / "out"), "--force"])
    assert code == 0 and (tmp_path / "out" / "train-00000-of-00001.parquet").is_file()


@pytest.mark.slow
def test_tiny_trains_on_a_folder_of_shards(shapes: Path, tmp_path: Path) -> None:
    convert(shapes, shapes.parent, "parquet", tmp_path / "pq", shard_records=4)
    result, _ = train_recipe(
        [f"data.data_path={tmp_path / 'pq'}", "training.max_steps=2", f"training.output_dir={tmp_path / 'run'}"]
    )
    assert result.status == "completed" and result.step == 2


def test_a_hub_data_set_in_the_hf_cache_is_found_by_its_name(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "hub" / "datasets--org--shapes" / "snapshots" / "0123abc" / "data"
    convert(shapes, shapes.parent, "parquet", snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    source = open_data_path("org/shapes", None, seed=0)
    path, folder = source.path, source.image_folder
    assert path == folder == snapshot.parent and len(open_records(path)) == 8


def test_arrow_stream_shards_as_datasets_caches_them_are_read(shapes: Path, tmp_path: Path) -> None:
    [shard] = convert(shapes, shapes.parent, "parquet", tmp_path / "pq")
    table = pq.read_table(shard)
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    store = open_records(tmp_path / "data-00000-of-00001.arrow")
    assert [store.raw(i).value["id"] for i in range(len(store))] == [f"shapes-{i:06d}" for i in range(8)]
    assert open_rgb(Path(store.raw(3).value["image"])).size == (32, 32)


def test_doctor_finds_the_embedded_images_of_shards(shapes: Path, tmp_path: Path) -> None:
    from llavactl.data.source import open_source
    from llavactl.doctor.profile_checks import data_checks

    convert(shapes, shapes.parent, "parquet", tmp_path / "pq")
    data = DataConfig(data_path=str(tmp_path / "pq"))
    [check] = data_checks(data, lambda: open_source(data, 0))
    assert check.status == "pass", check


def test_a_second_check_of_shards_reads_the_counts_back_until_a_shard_changes(
    cache: Path, shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llavactl.data import lengths

    tok = byte_tokenizer()
    tokens = TokenContext(tok, image_id(tok), SPEC)
    [shard] = convert(shapes, shapes.parent, "parquet", tmp_path / "pq")
    first, _ = check_dataset(tmp_path / "pq", tmp_path, "vicuna_v1", 256, tokens)
    counted = lengths.count_records

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("counted again")

    monkeypatch.setattr(lengths, "count_records", refuse)
    again, _ = check_dataset(tmp_path / "pq", tmp_path, "vicuna_v1", 256, tokens)
    assert again.as_json() == first.as_json() and first.stats["length"] is not None
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, 7), shard)  # one record fewer: counted anew
    monkeypatch.setattr(lengths, "count_records", counted)
    changed, _ = check_dataset(tmp_path / "pq", tmp_path, "vicuna_v1", 256, tokens)
    assert changed.records == 7


def test_a_damaged_page_is_a_bad_row_not_a_crash(shapes: Path, tmp_path: Path) -> None:
    [shard] = convert(shapes, shapes.parent, "parquet", tmp_path / "pq")
    damaged = bytearray(shard.read_bytes())
    damaged[200:1200] = b"\xff" * 1000  # inside the first column chunk, far from the footer
    shard.write_bytes(bytes(damaged))
    report, _ = check_dataset(tmp_path / "pq", tmp_path, "vicuna_v1", 256, None)
    assert {p.code for p in report.problems} == {"bad_json"} and report.bad_indices() == set(range(8))
    assert report.problems[0].message.startswith("train-00000-of-00001.parquet row 0: the row cannot be decoded")


def test_a_damaged_shard_among_good_ones_is_named(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llavactl.data.source import open_records
    from llavactl.errors import DataError

    table = pa.table(
        {"id": ["a"], "conversations": [[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]]}
    )
    pq.write_table(table, tmp_path / "train-0.parquet")
    (tmp_path / "train-1.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"train-1\.parquet: not readable Parquet/Arrow"):
        open_records(tmp_path / "train-*.parquet")
