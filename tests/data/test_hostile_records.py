"""Hostile data files: deep nesting, huge numbers, lone surrogates, no records, and --write-clean
aimed at the data itself or at something that is not a writable file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli

from llavactl.data.check import check_dataset, write_clean
from llavactl.data.json_index import load_records, read_raw_records
from llavactl.errors import DataError

GOOD = '{"id": "g", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'


def line(rid: str, question: str = "q", **extra: str) -> str:
    """A JSONL line written by hand, so that escapes such as \\ud800 reach the file as written."""
    more = "".join(f', "{k}": {v}' for k, v in extra.items())
    convo = f'[{{"from": "human", "value": "{question}"}}, {{"from": "gpt", "value": "a"}}]'
    return f'{{"id": {rid}, "conversations": {convo}{more}}}'


def jsonl(folder: Path, *lines: str, name: str = "d.jsonl") -> Path:
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def codes(path: Path) -> set[tuple[int | None, str]]:
    report, _ = check_dataset(path, path.parent, "vicuna_v1", 256, None)
    return {(p.index, p.code) for p in report.problems}


def test_deep_nesting_is_bad_json_on_its_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path, GOOD, '{"id": "d", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    raws, problems = read_raw_records(path)
    assert [r.index for r in raws] == [0]
    assert [(p.index, p.code, p.message) for p in problems] == [
        (1, "bad_json", "line 2: values nested too deeply to read (thousands of levels)")
    ]


def test_deep_nesting_in_a_json_list_is_a_problem_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("[" + GOOD + ", " + "[" * 100_000 + "]" * 100_000 + "]", encoding="utf-8")
    assert codes(path) == {(None, "bad_json")}


def test_a_5000_digit_id_is_bad_json_and_a_65_bit_id_is_a_bad_id(tmp_path: Path) -> None:
    path = jsonl(tmp_path, GOOD, line("9" * 5000), line(str(2**64)), line(str(2**62)))
    _, problems = read_raw_records(path)
    assert [(p.index, p.message) for p in problems] == [(1, "line 2: a number of over 4,300 digits")]
    assert codes(path) == {(1, "bad_json"), (2, "missing_field")}
    with pytest.raises(DataError, match="outside the 64-bit integers"):
        load_records(jsonl(tmp_path, GOOD, line(str(2**64)), name="big.jsonl"))


@pytest.mark.parametrize(
    ("rid", "question", "where"),
    [('"s\\ud800"', "q", "`id`"), ('"s"', "q\\udc00", "turn 0 `value`")],
    ids=["id", "turn"],
)
def test_a_lone_surrogate_is_bad_text(tmp_path: Path, rid: str, question: str, where: str) -> None:
    path = jsonl(tmp_path, GOOD, line(rid, question))
    report, _ = check_dataset(path, tmp_path, "vicuna_v1", 256, None)
    (problem,) = report.problems
    assert (problem.index, problem.code) == (1, "bad_text")
    assert problem.message.startswith(f"{where} holds a lone surrogate")
    json.dumps(report.as_json(), ensure_ascii=False).encode("utf-8")  # the --json report can be written
    with pytest.raises(DataError, match="bad_text"):
        load_records(path)


def test_write_clean_keeps_a_surrogate_outside_the_text_escaped(tmp_path: Path) -> None:
    path = jsonl(tmp_path, line('"m"', meta='"\\ud800"'))
    report, raws = check_dataset(path, tmp_path, "vicuna_v1", 256, None)
    assert report.problems == []
    out = tmp_path / "clean.jsonl"
    assert write_clean(raws, report, out) == 1
    assert json.loads(out.read_text(encoding="utf-8"))["meta"] == "\ud800"


@pytest.mark.parametrize("text", ["[]", "", "\n\n  \n"], ids=["empty-list", "empty-file", "blank-lines"])
def test_no_records_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(text, encoding="utf-8")
    report, _ = check_dataset(path, tmp_path, "vicuna_v1", 256, None)
    assert [(p.index, p.code) for p in report.errors] == [(None, "no_records")]
    assert report.stats["records_with_errors"] == 0


def test_a_byte_order_mark_is_not_part_of_the_json(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf[" + GOOD.encode() + b"]")
    assert codes(path) == set()


def profile(folder: Path, data: Path) -> Path:
    path = folder / "p.yaml"
    path.write_text(
        "model:\n  model_name_or_path: builtin:tiny-llama\n  vision_tower: builtin:tiny-clip\n"
        f"data:\n  data_path: {data}\n  max_seq_len: 256\n",
        encoding="utf-8",
    )
    return path


def check(*args: str) -> tuple[int, str, str]:
    return run_cli(["data", "check", *args])


def test_cli_empty_data_exits_1(tmp_path: Path) -> None:
    data = tmp_path / "d.json"
    data.write_text("[]", encoding="utf-8")
    code, out, _ = check("-p", str(profile(tmp_path, data)))
    assert code == 1 and "no_records" in out


def test_cli_hostile_records_exit_1_not_internal_error(tmp_path: Path) -> None:
    data = jsonl(
        tmp_path, GOOD, '{"id": 1, "x": ' + "[" * 50_000 + "]" * 50_000 + "}", line("9" * 5000), line('"s\\ud800"')
    )
    report = tmp_path / "r.json"
    code, out, err = check("-p", str(profile(tmp_path, data)), "--json-file", str(report))
    assert code == 1, out + err
    assert {p["code"] for p in json.loads(report.read_text(encoding="utf-8"))["problems"]} == {"bad_json", "bad_text"}


def test_write_clean_refuses_the_data_file_itself(tmp_path: Path) -> None:
    data = jsonl(tmp_path, GOOD, line("7", question="<image>"))
    before = data.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(data)
    for target in (str(data), str(tmp_path / "." / "d.jsonl"), str(tmp_path / "link.jsonl")):
        code, _, err = check("-p", str(profile(tmp_path, data)), "--write-clean", target)
        assert code == 2 and "is a file of the data being checked" in " ".join(err.split())
    assert data.read_bytes() == before


def test_no_output_goes_over_a_mixture_source_or_a_shard(tmp_path: Path) -> None:
    """The files of a mixture's sources and a folder's shards are the data as much as a JSON file is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = jsonl(tmp_path, GOOD, GOOD.replace('"g"', '"h"'))
    mixture = tmp_path / "mix.yaml"
    mixture.write_text("datasets:\n  - json_path: d.jsonl\n    sampling_strategy: first:1\n", encoding="utf-8")
    (tmp_path / "shards").mkdir()
    shard = tmp_path / "shards" / "s-0.parquet"
    pq.write_table(pa.Table.from_pylist([json.loads(GOOD)]), shard)
    for source, target in ((mixture, data), (mixture, mixture), (tmp_path / "shards", shard)):
        before = target.read_bytes()
        for option in ("--write-clean", "--json-file"):
            code, _, err = check("-p", str(profile(tmp_path, source)), option, str(target))
            assert code == 2, err
            assert f"{option} {target} is a file of the data being checked" in " ".join(err.split())
        assert target.read_bytes() == before


def test_write_clean_with_limit_is_refused_before_checking(tmp_path: Path) -> None:
    """The clean file would hold the first N records and silently lose the rest."""
    data = jsonl(tmp_path, GOOD, GOOD)
    code, _, err = check("-p", str(profile(tmp_path, data)), "--limit", "1", "--write-clean", str(tmp_path / "c.json"))
    assert code == 2 and "--write-clean with --limit 1" in err and not (tmp_path / "c.json").exists()


def test_write_clean_to_a_folder_or_under_a_file_is_a_clean_error(tmp_path: Path) -> None:
    data = jsonl(tmp_path, GOOD)
    report, raws = check_dataset(data, tmp_path, "vicuna_v1", 256, None)
    with pytest.raises(DataError, match="cannot be written \\(Is a directory"):
        write_clean(raws, report, tmp_path)
    with pytest.raises(DataError, match="cannot be written"):
        write_clean(raws, report, data / "clean.jsonl")


def test_an_image_path_with_a_lone_surrogate_and_a_boolean_id_are_refused(tmp_path: Path) -> None:
    """A file name that is not UTF-8 reaches JSON as a lone surrogate: no table, report or shard can
    hold it. `true` is a Python int equal to 1: as an id it would collide with id 1."""
    path = jsonl(tmp_path, GOOD, line('"s"', image='"images/\\udcff.png"'), line("true"), line("1"))
    report, _ = check_dataset(path, tmp_path, "vicuna_v1", 256, None)
    found = {(p.index, p.code): p.message for p in report.problems}
    assert set(found) == {(1, "bad_text"), (2, "missing_field")}
    assert found[1, "bad_text"].startswith("`image` holds a lone surrogate ('\\udcff' at character 7)")
    assert found[2, "missing_field"] == "`id` must be a string or an integer, got True"
    code, out, err = run_cli(["data", "check", "-p", str(profile(tmp_path, path))])
    assert code == 1 and "Internal error" not in out + err


def test_shard_images_of_the_wrong_type_or_in_two_columns_are_refused_by_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    text_bytes = pa.struct([("bytes", pa.string()), ("path", pa.string())])
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(
        pa.table(
            {"id": ["s"], "conversations": [turns], "image": pa.array([{"bytes": "x", "path": "a.png"}], text_bytes)}
        ),
        folder / "a.parquet",
    )
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    both = {"image": pa.array([{"bytes": b"x", "path": "b.png"}], image)}
    both["images"] = pa.array([[{"bytes": b"y", "path": "c.png"}]], pa.list_(image))
    pq.write_table(pa.table({"id": ["b"], "conversations": [turns], **both}), folder / "b.parquet")
    report, _ = check_dataset(folder, tmp_path, "vicuna_v1", 256, None)
    found = {(p.index, p.code): p.message for p in report.problems}
    assert set(found) == {(0, "missing_field"), (1, "missing_field")}
    assert found[0, "missing_field"] == (
        "a.parquet row 0: column `image`: an embedded image's `bytes` is string, not binary "
        "(as `datasets`' Image feature writes it)"
    )
    assert found[1, "missing_field"].endswith(
        "the row has images in both `image` and `images`; keep them in one of the columns"
    )
    code, out, err = run_cli(["data", "check", "-p", str(profile(tmp_path, folder))])
    assert code == 1 and "Internal error" not in out + err


def test_json_records_in_the_parquet_layouts_say_which_keys_json_reads(tmp_path: Path) -> None:
    messages = '{"id": "m", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    path = jsonl(tmp_path, GOOD, messages, line('"i"', images='["a.png"]'))
    report, _ = check_dataset(path, tmp_path, "vicuna_v1", 256, None)
    found = {(p.index, p.code): p.message for p in report.problems}
    assert found == {
        (1, "missing_field"): "no `conversations` list (`messages`, the role/content layout, is read from Parquet "
        "shards only)",
        (2, "missing_field"): "`images` is read from Parquet shards only: a JSON record names its images in `image` "
        "(a path or a list of paths)",
    }
