"""Hostile profiles: not UTF-8, alias bombs, huge values, and one bad file among good ones.

Each ends in a ConfigError naming the file (and line) with a fix, quickly, quoting at most a
short excerpt of any value; `profiles list` still lists the good profiles.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llavactl.config.loader import load_profile
from llavactl.errors import EXCERPT_CHARS, ConfigError, excerpt

LAUGHS = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)),
    ]
)


def refused(path: Path, *overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_profile(str(path), overrides)
    return caught.value


def test_a_latin1_profile_names_the_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"extends: tiny\ndescription: caf\xe9\n")
    error = refused(path)
    assert f"{path}:2:17: not UTF-8 text (byte 30 is 0xe9)" in error.message
    assert "UTF-8" in error.fix


def test_a_binary_file_is_not_a_profile(tmp_path: Path) -> None:
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    assert "not UTF-8 text" in refused(path).message
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"a: \x00\x01\n")
    assert f"{nul}:1:4: this is not valid YAML (character #x0000 is not allowed" in refused(nul).message


def test_a_file_over_a_megabyte_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("description: " + "x" * (1 << 20) + "\n", encoding="utf-8")
    assert "too large for a profile" in refused(path).message


def test_billion_laughs_is_refused_in_well_under_a_second(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS + "\n", encoding="utf-8")
    start = time.perf_counter()
    error = refused(path)
    assert time.perf_counter() - start < 0.5
    assert "with its aliases (`*name`) expanded, this profile holds over 100,000 values" in error.message


def test_an_alias_bomb_in_an_override_is_refused_too(tmp_path: Path) -> None:
    flow = "[" + ", ".join(f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefg", "bcdefgh", strict=True))
    error = refused(Path("tiny"), f"training.report_to=[&a [1,1,1,1,1,1,1,1,1], {flow[1:]}]")
    assert "over 100,000 values" in error.message


def test_a_value_that_contains_itself_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("extends: tiny\ntraining:\n  report_to: &r [*r]\n", encoding="utf-8")
    assert f"{path}:3: this value contains itself through an alias" in refused(path).message


def test_deep_nesting_and_huge_integers_are_messages(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 20000 + "]" * 20000 + "\n", encoding="utf-8")
    assert "nested too deeply" in refused(deep).message
    digits = tmp_path / "digits.yaml"
    digits.write_text("extends: tiny\nseed: " + "9" * 5000 + "\n", encoding="utf-8")
    assert "a value cannot be read" in refused(digits).message


def test_errors_quote_only_an_excerpt_of_a_value(tmp_path: Path) -> None:
    path = tmp_path / "long.yaml"
    big = ["x" * 10_000] * 50
    path.write_text(f"extends: tiny\ntraining:\n  learning_rate: {big}\n", encoding="utf-8")
    error = refused(path, "training.output_dir=[" + "y" * 200_000 + "]", "z" * 100_000 + "=1")
    assert len(str(error)) < 2000
    assert "Input should be a valid number (got [" in error.message
    assert "…" in error.message


def test_excerpt_is_bounded_for_any_value() -> None:
    assert excerpt("short") == "'short'"
    for value in ("x" * 10**6, list(range(10**5)), {str(i): i for i in range(10**4)}, 10**5000):
        assert len(excerpt(value)) <= EXCERPT_CHARS


def test_a_profile_name_longer_than_any_path_is_refused() -> None:
    error = refused(Path("p" * 100_000))
    assert "100,000 characters long" in error.message and len(error.message) < 300


def test_profiles_list_lists_the_good_and_names_the_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "good.yaml").write_text("extends: tiny\ndescription: a good one\n", encoding="utf-8")
    (folder / "binary.yaml").write_bytes(bytes(range(256)))
    (folder / "laughs.yaml").write_text(LAUGHS + "\n", encoding="utf-8")
    (folder / "surrogate.yaml").write_text('extends: tiny\ndescription: "a\\ud800"\n', encoding="utf-8")
    env = {**os.environ, "COLUMNS": "250"}
    env.pop("LLAVACTL_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "llavactl", "profiles", "list"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "a good one" in rows["good"] and "tiny" in rows
    assert "invalid:" in rows["binary"] and "not UTF-8 text" in rows["binary"]
    assert "invalid:" in rows["laughs"] and "aliases" in rows["laughs"]
    # A profile with several problems shows its first, not the headline "has 1 problem:".
    assert "invalid: description (profiles/surrogate.yaml:2): Input holds a lone surrogate" in rows["surrogate"]
