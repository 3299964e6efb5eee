"""What commands print: one JSON document under --json (the result or one error object), blocks at 80 columns."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_cli

from llavactl.cli._common import console
from llavactl.jsonout import dumps


def test_json_text_escapes_what_would_break_a_terminal_and_keeps_the_values() -> None:
    value = {"id\x85": "a\x1b[2J\x9b[31m\u2028\ud800 café 漢字", "n": [1, None]}
    text = dumps(value)
    assert json.loads(text) == value
    text.encode("utf-8")  # a lone surrogate would not encode
    assert "café 漢字" in text
    assert not any(c in text for c in "\x1b\x85\x9b\u2028\ud800")
    assert "\\u001b[2J\\u009b[31m\\u2028\\ud800" in text


def test_a_failure_under_json_is_one_error_object_on_stdout(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    code, out, err = run_cli(["data", "check", "--profile", "tiny", f"data.data_path={missing}", "--json"])
    assert code == 2
    error = json.loads(out)["error"]
    assert error["kind"] == "data" and error["exit_code"] == 2
    assert f"data.data_path: {missing} is not a file" in error["message"] and error["fix"]
    assert err.startswith(f"Error: data.data_path: {missing} is not a file")


def test_a_result_that_fails_carries_the_error_object_in_its_one_document(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    code, out, err = run_cli(["doctor", "--profile", "tiny", f"data.data_path={missing}", "--json"])
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert data["error"] == {
        "kind": "check_failed",
        "message": "1 check failed: data.",
        "fix": "apply the fix of each failed check above, then run doctor again",
        "exit_code": 1,
    }
    assert "Error: 1 check failed: data." in err


def test_doctor_prints_each_check_as_a_block_with_paths_whole_at_the_width(tmp_path: Path) -> None:
    missing = tmp_path / ("a-folder-name-long-enough-to-pass-the-line-end" * 2) / "records.json"
    code, out, _ = run_cli(["doctor", "--profile", "tiny", f"data.data_path={missing}"])
    assert code == 1
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("fail    data: "))
    block = lines[start : start + 4]
    assert str(missing) in block[1].split()  # on a line of its own, not split
    assert all(line.startswith(" " * 8) for line in block[1:])
    assert any(line.startswith("        fix: set `data.data_path`") for line in block)
    assert all(len(line) <= console.width for line in lines if str(missing) not in line)
