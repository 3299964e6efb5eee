"""The record store: one scan of a data file, an index in the cache reused while the file is
unchanged and never after, records decoded one at a time with the lines they start on."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import byte_tokenizer, image_id, record

from llavactl.config.schema import DataConfig
from llavactl.data import json_index as store_module
from llavactl.data.dataset import Skipped, build_dataset
from llavactl.data.images import ImageSpec
from llavactl.data.json_index import RecordStore
from llavactl.data.records import Record, RecordProblem
from llavactl.data.source import open_records, open_source
from llavactl.errors import DataError

SPEC = ImageSpec(32, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# Strings that hold what the scan looks for: quotes, escapes, brackets, commas, the image key.
TRICKY = ['a "quoted" [list], {obj}', "back\\slash\\", 'ends in \\"', "\\\\", '"image": x', "日本 é", ""]


def start_lines(text: str) -> list[int]:
    """Where each element of a JSON list starts, found by decoding it (what the scan must match)."""
    decoder, pos, lines = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return lines
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)


def values(s: RecordStore) -> list[object]:
    return [s.raw(i).value for i in range(len(s))]


def test_the_index_is_written_once_and_read_back_without_a_scan(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([record(("human", "q"), ("gpt", "a"), rid=i) for i in range(3)], indent=2))
    first = open_records(path)
    assert open_records(path) is first  # one store per file and process
    (index,) = cache.iterdir()
    store_module._open.cache_clear()  # as a new process

    def no_scan(_: Path) -> None:
        raise AssertionError("scanned again")

    monkeypatch.setattr(store_module, "scan", no_scan)
    again = open_records(path)
    assert again is not first and values(again) == values(first) and list(cache.iterdir()) == [index]


@pytest.mark.parametrize("change", ["same size, other mtime", "other size"])
def test_a_changed_file_is_scanned_again_and_its_old_index_dropped(cache: Path, tmp_path: Path, change: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "aaaa"}, {"id": "bbbb"}]))
    assert values(open_records(path)) == [{"id": "aaaa"}, {"id": "bbbb"}]
    stat = path.stat()
    new = [{"id": "cccc"}, {"id": "dddd"}] if change == "same size, other mtime" else [{"id": "c"}, {"id": "d"}, {}]
    path.write_text(json.dumps(new))
    if change == "same size, other mtime":
        assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    store_module._open.cache_clear()
    assert values(open_records(path)) == new
    assert len(list(cache.iterdir())) == 1


def test_records_and_lines_match_a_full_decode_across_chunk_edges(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elements = [
        record(("human", f"<image>\n{t}"), ("gpt", t), rid=i, image=f"{i}.png" if i % 2 else None)
        for i, t in enumerate(TRICKY)
    ]
    elements += [[1, [2, {"image": 3}]], "text, with a comma", 4.5, None]
    for indent in (None, 2):
        text = json.dumps(elements, indent=indent, ensure_ascii=indent is None)
        path = tmp_path / f"d{indent}.json"
        path.write_text(text, encoding="utf-8")
        for chunk in (1, 3, 7, 64, 1 << 20):  # chunks cut quotes, escapes and keys everywhere
            monkeypatch.setattr(store_module, "CHUNK_BYTES", chunk)
            kind, index, problems = store_module.scan(path)
            s = RecordStore(path, kind, index, problems)
            assert values(s) == elements and problems == []
            assert [s.raw(i).line for i in range(len(s))] == start_lines(text)
            # Records with an image key are all found (the estimate that grouping uses).
            assert s.has_image()[: len(TRICKY)].tolist() == [i % 2 == 1 for i in range(len(TRICKY))]


def test_a_byte_order_mark_and_jsonl_blank_lines(cache: Path, tmp_path: Path) -> None:
    listed = tmp_path / "bom.json"
    listed.write_bytes(b'\xef\xbb\xbf[\n  {"id": 1},\n  {"id": 2}\n]\n')
    s = open_records(listed)
    assert [(r.index, r.line, r.value) for r in s] == [(0, 2, {"id": 1}), (1, 3, {"id": 2})]
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b'\xef\xbb\xbf{"id": 1}\r\n\n   \n{"id": 2}\n')
    s = open_records(lines)
    assert [(r.index, r.line, r.value) for r in s] == [(0, 1, {"id": 1}), (1, 4, {"id": 2})]


def test_a_bad_element_is_a_problem_of_its_own_line(cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"id": 1},\n  {"id": 2,\n   "x": tru},\n  {"id": 3}\n]\n')
    s = open_records(path)
    assert len(s) == 3 and s.raw(2).value == {"id": 3}
    with pytest.raises(RecordProblem, match=r"line 4, column 9: Expecting value"):
        s.raw(1)
    # As a whole the file is not JSON: json's own words, where it stops.
    assert s.file_problem().message == "line 4, column 9: Expecting value"


@pytest.mark.parametrize("text", ["[1,]", "[1}", '["a]', "[1] x", "[", "[{}"])
def test_a_broken_list_is_one_problem_and_no_records(tmp_path: Path, text: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(text)
    s = open_records(path)
    assert len(s) == 0 and [p.code for p in s.problems] == ["bad_json"]
    assert s.problems[0].message.startswith("line 1, column")


def test_a_missing_or_binary_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_records(tmp_path / "nope.json")
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        open_records(path)


def test_the_dataset_decodes_a_record_only_when_asked(shapes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[int] = []
    raw = RecordStore.raw
    monkeypatch.setattr(RecordStore, "raw", lambda self, i: read.append(i) or raw(self, i))
    tok = byte_tokenizer()
    dataset = build_dataset(
        open_source(DataConfig(data_path=str(shapes)), 0), DataConfig(data_path=str(shapes)), tok, image_id(tok), SPEC
    )
    lengths = dataset.modality_lengths()
    assert read == [] and len(lengths) == len(dataset) == 8 and all(n > 0 for n in lengths)
    item = dataset[5]
    assert read == [5] and not isinstance(item, Skipped) and item["index"] == 5


def test_the_shapes_records_are_the_files_records(shapes: Path) -> None:
    s = open_records(shapes)
    expected = json.loads(shapes.read_text(encoding="utf-8"))
    parsed = list(s.parsed())
    assert all(isinstance(r, Record) for r in parsed)
    assert [r.raw for r in parsed] == expected and [r.index for r in parsed] == list(range(len(expected)))
    sizes = s.sizes()
    assert np.all(sizes > 0) and s.has_image().all()


def test_a_store_travels_to_a_worker_process(shapes: Path) -> None:
    s = open_records(shapes)
    s.raw(0)  # the descriptor is open here; a copy opens its own
    copy = pickle.loads(pickle.dumps(s))
    assert copy.raw(3) == s.raw(3)


_SCAN_ONCE = """
import sys, time
from pathlib import Path
from llavactl.data import cache, json_index, source
cache.CACHE_MIN_BYTES = 0
scan = json_index.scan
def slow_scan(path):
    with open(sys.argv[2], "a") as log:
        log.write("scan\\n")
    time.sleep(1.0)  # long enough that the other process asks for the index meanwhile
    return scan(path)
json_index.scan = slow_scan
print(len(source.open_records(Path(sys.argv[1]))))
"""


def test_processes_that_start_together_scan_a_file_once(cache: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "d.json"
    path.write_text(json.dumps([record(("human", f"q{i}"), ("gpt", "a")) for i in range(50)], indent=2))
    log = tmp_path / "scans.log"
    env = {**os.environ, "LLAVACTL_CACHE": str(cache.parent)}
    argv = [sys.executable, "-c", _SCAN_ONCE, str(path), str(log)]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["50", "50"]
    # One scanned and kept the index; the other waited for it and read it back.
    assert log.read_text() == "scan\n"
    assert len(list(cache.glob("*.npy"))) == 1


@pytest.mark.parametrize("at", [0, 5, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 2_500_000])
def test_a_file_that_is_not_utf8_is_named_by_its_first_bad_byte_line_and_column(tmp_path: Path, at: int) -> None:
    """The line and column of the first byte UTF-8 does not decode, wherever the reads cut the
    file (every character of its text is two bytes, so some reads end inside one)."""
    text = bytearray(("é" * 7 + "\n") * 200_000, "utf-8")  # 3.2 MB, a line every 15 bytes
    within = min(at % 15, 12)  # the first byte of the character at or just before `at`
    start = at - at % 15 + within - within % 2
    text[start] = 0xE4  # Latin-1's "ä": not UTF-8 before "é"'s bytes
    path = tmp_path / "d.jsonl"
    path.write_bytes(bytes(text))
    line, column = text[:start].count(b"\n") + 1, start - text[:start].rfind(b"\n")
    with pytest.raises(DataError, match=rf"byte 0xe4 at line {line:,}, column {column:,} is not UTF-8"):
        open_records(path)


@pytest.mark.parametrize(
    ("encoding", "said"),
    [
        ("utf-16", "is UTF-16 text (it starts with UTF-16's byte-order mark), not UTF-8"),
        ("utf-32", "is UTF-32 text (it starts with UTF-32's byte-order mark), not UTF-8"),
        ("utf-16-le", "its first bytes hold NUL bytes, as UTF-16 or UTF-32 text does"),
        ("utf-16-be", "its first bytes hold NUL bytes, as UTF-16 or UTF-32 text does"),
    ],
)
def test_utf16_and_utf32_files_are_named_as_such(tmp_path: Path, encoding: str, said: str) -> None:
    path = tmp_path / "d.json"
    path.write_bytes('[{"id": "a", "conversations": []}]'.encode(encoding))
    with pytest.raises(DataError, match=re.escape(said)):
        open_records(path)


def test_a_pretty_printed_object_is_one_problem_of_the_file_not_a_bad_record_a_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"id": "a", "conversations": []}, indent=2), encoding="utf-8")
    store = open_records(path)
    assert len(store) == 0
    assert [(p.index, p.code) for p in store.problems] == [(None, "bad_json")]
    assert store.problems[0].message.startswith("the file is one JSON object spread over lines")
