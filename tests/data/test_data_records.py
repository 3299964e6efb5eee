"""Reading LLaVA records: JSON and JSONL, ids, images, roles, and the structural problem codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import REFERENCE, record, write_json

from llavactl.data.json_index import load_records, read_raw_records
from llavactl.data.records import Problem, RecordProblem, check_image_markers, iter_records
from llavactl.errors import DataError


def parsed(tmp_path: Path, *values: object) -> list:
    raws, problems = read_raw_records(write_json(tmp_path / "d.json", list(values)))
    assert problems == []
    return [p for _, p in iter_records(raws)]


def test_real_llava_records_load_with_int_ids_text_only_and_unknown_keys() -> None:
    records = load_records(REFERENCE / "llava_real_samples.json")
    assert len(records) == 10
    assert records[3].id == 2327515
    assert records[0].images == ("images/extreme_ironing.jpg",)
    assert records[0].turns[0].role == "human" and len(records[0].turns) == 6
    assert records[9].images == ()  # ShareGPT text-only record
    assert records[5].raw["data_source"] == "azure_dc_zh_92K"  # ignored, kept for --write-clean


def test_invalid_docs_snippet_is_bad_json_with_line_and_column() -> None:
    raws, problems = read_raw_records(REFERENCE / "llava_docs_custom_data_snippet_INVALID.json.txt")
    assert raws == []
    assert problems == [Problem("bad_json", "line 14, column 5: Expecting value")]


def test_jsonl_reports_each_bad_line_and_loads_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    good = '{"id": 1, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'
    path.write_text(f"{good}\n{{oops\n\n{good}\n", encoding="utf-8")
    raws, problems = read_raw_records(path)
    assert [(r.index, r.line) for r in raws] == [(0, 1), (2, 4)]
    assert problems == [Problem("bad_json", "line 2, column 2: Expecting property name enclosed in double quotes", 1)]


def test_multi_image_list_is_kept_in_order(tmp_path: Path) -> None:
    (r,) = parsed(tmp_path, record(("human", "<image> vs <image>"), ("gpt", "b"), image=["a.png", "b.png"]))
    assert r.images == ("a.png", "b.png") and r.marker_count == 2


@pytest.mark.parametrize(
    ("value", "code", "words"),
    [
        ({"id": "x"}, "missing_field", "conversations"),
        ({"id": "x", "conversations": [{"from": "human"}]}, "missing_field", "value"),
        (record(("human", "q"), ("gpt", "a"), image=7), "missing_field", "image"),
        (record(("user", "q"), ("gpt", "a")), "bad_role", "'user'"),
        (record(("gpt", "a"), ("human", "q")), "bad_role", "turn 0 is 'gpt'"),
        (record(("human", "q"), ("gpt", "a"), ("human", "q2")), "bad_role", "last turn"),
        (record(("system", "s"), ("human", "q"), ("system", "s2")), "bad_role", "turn 2 is 'system'"),
    ],
)
def test_structural_problems_have_their_code(tmp_path: Path, value: dict, code: str, words: str) -> None:
    (p,) = parsed(tmp_path, value)
    assert isinstance(p, Problem) and p.code == code and words in p.message and p.index == 0


def test_marker_count_must_equal_image_count(tmp_path: Path) -> None:
    (two_markers,) = parsed(tmp_path, record(("human", "<image><image>"), ("gpt", "a"), image="a.png"))
    with pytest.raises(RecordProblem) as e:
        check_image_markers(two_markers)
    assert e.value.code == "image_token_mismatch"
    (text_only,) = parsed(tmp_path, record(("human", "<image> hi"), ("gpt", "a")))
    with pytest.raises(RecordProblem):
        check_image_markers(text_only)


def test_load_records_names_the_bad_record(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", [record(("human", "q"), ("gpt", "a")), {"id": "b2"}])
    with pytest.raises(DataError, match=r"record 1 \(id 'b2', line \d+\): missing_field"):
        load_records(path)
