"""`data check`: one crafted record per problem code, the report, exit codes and --write-clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REFERENCE, byte_tokenizer, image_id, llama_tokenizer, record, run_cli
from PIL import Image

from llavactl.data.check import check_dataset
from llavactl.data.images import ImageSpec
from llavactl.data.tokens import TokenContext

SPEC = ImageSpec(32, 8, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
MAX_LEN = 256
# One record per problem code (index -> code); records 0 and 10 are clean.
EXPECTED = {
    1: "bad_json",
    2: "missing_field",
    3: "bad_role",
    4: "image_token_mismatch",
    5: "missing_image",
    6: "corrupt_image",
    7: "empty_supervision",
    8: "too_long",
    9: "duplicate_id",
}


def crafted(folder: Path) -> Path:
    Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / "ok.png")
    (folder / "broken.png").write_text("not a png")
    ok = {"image": "ok.png"}
    lines = [
        json.dumps(record(("human", "<image>\nWhat is it?"), ("gpt", "A square."), rid="good", **ok)),
        '{"id": "half", "conversations": [',
        json.dumps({"id": "nofield"}),
        json.dumps(record(("gpt", "a"), ("human", "q"), rid="order")),
        json.dumps(record(("human", "<image><image>"), ("gpt", "a"), rid="two-markers", **ok)),
        json.dumps(record(("human", "q"), ("gpt", "a"), rid="lost", image="gone.png")),
        json.dumps(record(("human", "q"), ("gpt", "a"), rid="broken", image="broken.png")),
        json.dumps(record(("human", " x" * 250), ("gpt", "a"), rid="no-room", **ok)),
        json.dumps(record(("human", "q"), ("gpt", " a" * 250), rid="long", **ok)),
        json.dumps(record(("human", "q"), ("gpt", "a"), rid="good", **ok)),
        json.dumps(record(("human", "hello"), ("gpt", "hi"), rid=11)),
    ]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_check(folder: Path, tokens: TokenContext | None, **kw: object) -> object:
    report, _ = check_dataset(crafted(folder), folder, "vicuna_v1", MAX_LEN, tokens, **kw)
    return report


def tokens_of(tok: object) -> TokenContext:
    return TokenContext(tok, image_id(tok), SPEC)


@pytest.mark.parametrize("tokenizer", [byte_tokenizer, llama_tokenizer], ids=["bytes", "llama-spm"])
def test_every_problem_code_is_found_on_its_record(tmp_path: Path, tokenizer: object) -> None:
    report = run_check(tmp_path, tokens_of(tokenizer()))
    found = {(p.index, p.code) for p in report.problems}
    assert found == set(EXPECTED.items())
    by_code = {p.code: p for p in report.problems}
    assert by_code["bad_json"].message.startswith("line 2, column")
    assert by_code["duplicate_id"].severity == by_code["too_long"].severity == "warning"
    assert "supervised tokens would be cut" in by_code["too_long"].message
    assert by_code["duplicate_id"].id == "good" and "record 0" in by_code["duplicate_id"].message
    assert report.records == 11 and report.bad_indices() == {1, 2, 3, 4, 5, 6, 7}


def test_stats_count_modalities_and_lengths_with_image_tokens(tmp_path: Path) -> None:
    report = run_check(tmp_path, tokens_of(byte_tokenizer()))
    s = report.stats
    assert (s["records"], s["with_image"], s["text_only"], s["multi_image"]) == (11, 7, 1, 0)
    assert s["length"]["over_max_seq_len"] == 1  # "long"; "no-room" cannot train, so it has no length
    assert s["length"]["min"] <= s["length"]["p50"] <= s["length"]["p99"] <= s["length"]["max"]
    assert sum(b["count"] for b in s["histogram"]) == 6  # records whose text tokenizes: 0, 5, 6, 8, 9, 10
    assert s["problems_by_code"]["missing_image"] == 1


def test_without_tokenizer_structure_and_images_are_still_checked(tmp_path: Path) -> None:
    report = run_check(tmp_path, None, skipped_checks=("token lengths: no tokenizer",))
    found = {code for _, code in ((p.index, p.code) for p in report.problems)}
    assert found == set(EXPECTED.values()) - {"empty_supervision", "too_long"}
    assert report.stats["length"] is None and report.skipped_checks == ["token lengths: no tokenizer"]


def test_decode_mode_with_workers_finds_truncated_images(tmp_path: Path) -> None:
    path = crafted(tmp_path)
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "ok.png").write_bytes(data[: len(data) // 2])
    header_only, _ = check_dataset(path, tmp_path, "vicuna_v1", MAX_LEN, None)
    decoded, _ = check_dataset(path, tmp_path, "vicuna_v1", MAX_LEN, None, decode=True, workers=2)
    assert "corrupt_image" not in {p.code for p in header_only.problems if p.index == 0}
    assert "corrupt_image" in {p.code for p in decoded.problems if p.index == 0}


def profile_file(folder: Path, data_path: Path, model: str = "builtin:tiny-llama") -> Path:
    path = folder / "p.yaml"
    path.write_text(
        f"model:\n  model_name_or_path: {model}\n  vision_tower: builtin:tiny-clip\n"
        f"data:\n  data_path: {data_path}\n  image_folder: {data_path.parent}\n  max_seq_len: {MAX_LEN}\n",
        encoding="utf-8",
    )
    return path


def test_cli_exit_1_json_report_and_write_clean(tmp_path: Path) -> None:
    data = crafted(tmp_path)
    report_file, clean = tmp_path / "r.json", tmp_path / "clean.jsonl"
    args = ["data", "check", "-p", str(profile_file(tmp_path, data)), "--json-file", str(report_file)]
    code, out, err = run_cli([*args, "--write-clean", str(clean)])
    assert code == 1, out + err
    assert "empty_supervision" in out and "tokens per record" in out
    assert "Error: 7 records of 11 with errors (7 errors in all)" in err
    report = json.loads(report_file.read_text())
    assert set(report) == {"records", "problems", "stats", "skipped_checks"}
    assert {"index", "id", "code", "message"} <= set(report["problems"][0])
    kept = [json.loads(line)["id"] for line in clean.read_text().splitlines()]
    assert kept == ["good", "long", "good", 11]
    assert run_cli(["data", "check", "-p", str(profile_file(tmp_path, clean))])[0] == 0


def test_json_prints_the_report_to_stdout_and_the_old_file_form_names_the_new_option(tmp_path: Path) -> None:
    data = crafted(tmp_path)
    code, out, _ = run_cli(["data", "check", "-p", str(profile_file(tmp_path, data)), "--json"])
    assert code == 1 and json.loads(out)["records"] == 11
    code, out, err = run_cli(["data", "check", "-p", str(profile_file(tmp_path, data)), "--json", "r.json"])
    assert code == 2 and "--json-file r.json" in err and not (tmp_path / "r.json").exists()


def test_cli_exit_0_on_the_real_records_and_2_on_usage_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "model:\n  model_name_or_path: builtin:tiny-llama\n  vision_tower: builtin:tiny-clip\n"
        f"data:\n  data_path: {REFERENCE / 'llava_real_samples.json'}\n  max_seq_len: 4096\n",
        encoding="utf-8",
    )
    assert run_cli(["data", "check", "-p", str(path)])[0] == 0
    assert run_cli(["data", "check", "-p", str(path), "--limit", "0"])[0] == 2
    code, _, err = run_cli(["data", "check", "-p", str(path), f"data.data_path={tmp_path / 'nope.json'}"])
    assert code == 2 and "nope.json" in err and "Internal error" not in err


def test_cli_reports_what_it_skipped_without_a_tokenizer(tmp_path: Path) -> None:
    data = crafted(tmp_path)
    code, out, _ = run_cli(["data", "check", "-p", str(profile_file(tmp_path, data, model=str(tmp_path / "no-such")))])
    assert code == 1
    assert "skipped" in out and "token lengths" in out and "missing_image" in out


def test_preview_json_lists_supervised_spans(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "model:\n  model_name_or_path: builtin:tiny-llama\n  vision_tower: builtin:tiny-clip\n"
        f"data:\n  data_path: {REFERENCE / 'llava_real_samples.json'}\n  max_seq_len: 4096\n",
        encoding="utf-8",
    )
    code, out, err = run_cli(["data", "preview", "-p", str(path), "--index", "3", "--json"])
    assert code == 0, err
    (item,) = json.loads(out)
    assert item["id"] == 2327515 and item["supervised"] == [" Yes</s>", " No</s>"]
    assert "USER: <image x16>\nAre there scarves" in item["prompt"]
    code, shown, _ = run_cli(["data", "preview", "-p", str(path), "-n", "2"])
    assert code == 0 and "<image x16>" in shown


def test_synth_writes_a_dataset_that_checks_clean(tmp_path: Path) -> None:
    code, out, err = run_cli(["data", "synth", str(tmp_path / "s"), "--n", "12", "--seed", "4", "--image-size", "40"])
    assert code == 0, out + err
    records = tmp_path / "s" / "shapes.json"
    assert len(json.loads(records.read_text())) == 12
    assert run_cli(["data", "check", "-p", str(profile_file(tmp_path, records))])[0] == 0


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_the_check_holds_no_parsed_record_while_it_checks_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_tokenizer: bool
) -> None:
    # A parsed record holds its whole JSON value: 665K of them would cost several GiB.
    import gc

    from llavactl.data import check as check_module
    from llavactl.data.records import Record

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [record(("human", f"<image>\nq{i}"), ("gpt", "a"), image="a.png", rid=f"held-{i}") for i in range(30)]
    rows[3]["id"] = "held-0"  # a duplicate, found from what the check keeps
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    live: list[int] = []
    image_problems = check_module._image_problems

    def counting_records(*args: object, **kwargs: object) -> object:
        gc.collect()
        # This file's records only: other tests may leave records of their own alive.
        live.append(sum(isinstance(o, Record) and str(o.id).startswith("held-") for o in gc.get_objects()))
        return image_problems(*args, **kwargs)

    monkeypatch.setattr(check_module, "_image_problems", counting_records)
    tokens = tokens_of(byte_tokenizer()) if with_tokenizer else None
    report, _ = check_dataset(path, tmp_path, "vicuna_v1", MAX_LEN, tokens)
    assert live and live[0] <= 1  # at most the loop's last one
    assert [p.code for p in report.problems] == ["duplicate_id"] and report.stats["images"] == 30


def test_a_file_that_is_not_records_fails_naming_its_place_not_a_count_of_records(tmp_path: Path) -> None:
    """A list with one element that is not JSON is not JSON: the check names the line and column
    and says to correct the file (no record was read, so "0 of 0 records" would say nothing)."""
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"id": "a", "conversations": []},\n {"id": "b", oops}\n]\n', encoding="utf-8")
    code, out, err = run_cli(["data", "check", "-p", str(profile_file(tmp_path, bad))])
    assert code == 1, out + err
    assert "1 error of the file itself, 0 warnings" in out
    assert f"Error: {bad} cannot be read as records: line 3, column 14:" in err
    assert "[bad_json]" in err and "correct the file where the message says" in err
    assert "records have errors" not in err and "--write-clean" not in err
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    code, out, err = run_cli(["data", "check", "-p", str(profile_file(tmp_path, empty))])
    assert code == 1, out + err
    assert f"Error: {empty} holds no records" in err and "[no_records]" in err


def test_preview_of_a_file_that_is_not_records_is_an_error_not_an_empty_preview(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "conversations": []},]', encoding="utf-8")
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    for data, said in (
        (broken, "cannot be read as records: line 1, column 35: Expecting value"),
        (empty, "holds no records"),
    ):
        for extra in ([], ["--packed"], ["--index", "0"], ["--json"]):
            code, out, err = run_cli(["data", "preview", "-p", str(profile_file(tmp_path, data)), *extra])
            assert code == 2, out + err
            assert f"{data} {said}" in " ".join(err.split())


def test_a_special_token_written_in_a_record_s_text_is_a_warning_naming_the_token(tmp_path: Path) -> None:
    """With a real Llama tokenizer, `</s>` in a reply is the end-of-sequence id in mid-reply, not text."""
    tok = llama_tokenizer()
    path = tmp_path / "d.json"
    plain, marked = (
        record(("human", "q"), ("gpt", "a"), rid="plain"),
        record(("human", "q"), ("gpt", "a </s> b"), rid="eos"),
    )
    path.write_text(json.dumps([plain, marked]), encoding="utf-8")
    report, _ = check_dataset(path, tmp_path, "vicuna_v1", MAX_LEN, TokenContext(tok, image_id(tok), SPEC))
    (problem,) = report.problems
    assert (problem.index, problem.code, problem.severity) == (1, "special_token", "warning")
    assert problem.message.startswith(
        "turn 1 `value` holds '</s>', which the tokenizer reads as its special token (id 2)"
    )
    assert tok("a </s> b").input_ids.count(tok.eos_token_id) == 1 + tok("a b").input_ids.count(tok.eos_token_id)
    assert not report.errors


def test_control_characters_of_the_data_reach_the_terminal_escaped(tmp_path: Path) -> None:
    """A NUL or an escape sequence in a record's image path is printed as an escape, not sent raw."""
    path = tmp_path / "d.json"
    bad = record(("human", "<image>\nq"), ("gpt", "a"), rid="ctl", image="x\u0000y\u001b[2J.png")
    path.write_text(json.dumps([bad]), encoding="utf-8")
    code, out, err = run_cli(["data", "check", "-p", str(profile_file(tmp_path, path))])
    assert code == 1, out + err
    assert "x\\x00y\\x1b[2J.png" in out
    assert "\x00" not in out + err and "\x1b" not in out + err


def test_an_empty_reply_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    records = [record(("human", "q"), ("gpt", "a"), rid="ok"), record(("human", "q"), ("gpt", "  "), rid="blank")]
    path.write_text(json.dumps(records), encoding="utf-8")
    report, _ = check_dataset(path, tmp_path, "vicuna_v1", MAX_LEN, None)
    (problem,) = report.problems
    assert (problem.index, problem.code, problem.severity) == (1, "empty_reply", "warning")
    assert problem.message.startswith("turn 1 is a reply with no text")
