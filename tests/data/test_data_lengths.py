"""Exact token counts: `data check` counts every record once (over --workers processes), keeps the
counts (and its report) for exactly its inputs, and the next check, the planner and length grouping
read them back; a change to any input, an image included, is checked afresh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import byte_tokenizer, image_id, record
from PIL import Image

from llavactl.config.loader import load_profile
from llavactl.config.schema import DataConfig
from llavactl.data import lengths
from llavactl.data.check import check_dataset
from llavactl.data.dataset import LlavaDataset, Skipped, build_dataset
from llavactl.data.images import ImageSpec
from llavactl.data.source import open_records, open_source
from llavactl.data.tokens import TokenContext
from llavactl.plan import build as P

SPEC = ImageSpec(32, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def tokens() -> TokenContext:
    tok = byte_tokenizer()
    return TokenContext(tok, image_id(tok), SPEC)


def data_file(folder: Path, n: int = 6, words: int = 3) -> Path:
    path = folder / "d.json"
    rows = [record(("human", "q " * (i + 1)), ("gpt", "a " * words), rid=i) for i in range(n)]
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


def check(path: Path, max_seq_len: int = 256, workers: int = 1) -> dict:
    report, _ = check_dataset(path, path.parent, "vicuna_v1", max_seq_len, tokens(), workers=workers)
    return report.as_json()


def no_counting(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("counted again")

    monkeypatch.setattr(lengths, "count_records", refuse)


def test_a_second_check_reads_the_counts_back_and_reports_the_same(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = data_file(tmp_path)
    first = check(path)
    assert first["stats"]["length"] is not None and len(list((cache.parent / "lengths").iterdir())) == 1
    no_counting(monkeypatch)
    assert check(path) == first


@pytest.mark.parametrize("change", ["the data", "max_seq_len"])
def test_a_changed_input_is_counted_again(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    path = data_file(tmp_path)
    check(path)
    store = open_records(path)
    counted = []
    count_records = lengths.count_records
    monkeypatch.setattr(lengths, "count_records", lambda *a, **k: counted.append(1) or count_records(*a, **k))
    if change == "the data":
        data_file(tmp_path, words=4)  # each record two bytes longer
        report = check(path)
        assert open_records(path) is not store
    else:
        report = check(path, max_seq_len=255)
    assert counted == [1]
    assert report == check(path, max_seq_len=255 if change == "max_seq_len" else 256)


def test_workers_count_the_same_as_one_process(cache: Path, tmp_path: Path) -> None:
    path = data_file(tmp_path, n=20)
    store = open_records(path)
    one = lengths.count_records(store, tokens(), "vicuna_v1", 40, range(20))
    two = lengths.count_records(store, tokens(), "vicuna_v1", 40, range(20), workers=2)
    for column in ("full", "supervised", "cut", "images"):
        assert getattr(one, column).tolist() == getattr(two, column).tolist()
    assert one.problems == two.problems and one.cut.any()


def test_a_check_with_workers_counts_while_it_parses_and_reports_as_one_process(cache: Path, tmp_path: Path) -> None:
    path = data_file(tmp_path, n=20, words=30)
    two = check(path, max_seq_len=250, workers=2)
    (kept,) = (cache.parent / "lengths").iterdir()
    kept.unlink()
    for folder in ("checks",):
        for f in (cache.parent / folder).iterdir():
            f.unlink()
    assert check(path, max_seq_len=250, workers=1) == two
    assert [p["code"] for p in two["problems"]].count("too_long") > 0


def test_counting_left_before_its_counts_are_asked_for_keeps_nothing(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = data_file(tmp_path, n=40)
    store = open_records(path)
    prepare = lengths.prepare

    def slow(*args: object, **kwargs: object) -> object:  # the workers are forked: they run this too
        import time

        time.sleep(0.05)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(lengths, "prepare", slow)
    with lengths.counting(store, tokens(), "vicuna_v1", 256, len(store), workers=2):
        pass  # e.g. `data check` found the file's own problem: the counts are not needed
    # The ranges not started were dropped: partial counts are never kept as the file's.
    assert not (cache.parent / "lengths").exists() or not list((cache.parent / "lengths").iterdir())
    with lengths.counting(store, tokens(), "vicuna_v1", 256, len(store), workers=2) as counts_of:
        counts = counts_of()
    assert len(counts.full) == 40 and len(list((cache.parent / "lengths").iterdir())) == 1


def test_grouping_and_the_planner_use_the_exact_counts(cache: Path, shapes: Path) -> None:
    profile = load_profile("tiny", [f"data.data_path={shapes}"]).profile
    assembled = P.build_meta(profile, gradient_checkpointing=False)
    assert P.token_plan(profile, assembled).source == "8 of 8 records tokenized"
    context = TokenContext(assembled.tokenizer, assembled.image_token_id, assembled.image_spec)
    report, store = check_dataset(shapes, shapes.parent, "vicuna_v1", profile.data.max_seq_len, context)
    counts = lengths.cached_counts(store, context, "vicuna_v1", profile.data.max_seq_len)
    assert counts is not None and counts.built().all() and (counts.images == 1).all()
    plan = P.token_plan(profile, assembled)
    assert plan.source == "all 8 of 8 records (token counts kept by `data check`)"
    assert plan.longest == report.stats["length"]["max"] and plan.records_with_image == 8
    data = DataConfig(data_path=str(shapes), max_seq_len=profile.data.max_seq_len)
    dataset = build_dataset(
        open_source(data, 0), data, assembled.tokenizer, assembled.image_token_id, assembled.image_spec
    )
    assert dataset.modality_lengths().tolist() == counts.full.tolist()


def test_a_kept_report_is_not_read_once_an_image_changes(cache: Path, tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record(("human", "<image>\nq"), ("gpt", "a"), image="a.png")) + "\n")
    assert check(path)["problems"] == []
    (tmp_path / "a.png").unlink()
    assert [p["code"] for p in check(path)["problems"]] == ["missing_image"]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert check(path)["problems"] == []


def test_token_lengths_are_counted_once_then_read_back(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = data_file(tmp_path, n=6, words=12)
    tok = byte_tokenizer()

    def dataset(max_seq_len: int) -> LlavaDataset:
        return build_dataset(
            open_source(DataConfig(data_path=str(path), max_seq_len=max_seq_len), 0),
            DataConfig(data_path=str(path), max_seq_len=max_seq_len),
            tok,
            image_id(tok),
            SPEC,
        )

    whole = dataset(4096).token_lengths().tolist()
    cut_at = sorted(whole)[2]
    first = dataset(cut_at).token_lengths().tolist()
    assert first == [min(n, cut_at) for n in whole] and min(first) < cut_at
    # As the trainer builds them: cut at max_seq_len, a record that cannot be built counted at it.
    built = [dataset(cut_at)[i] for i in range(6)]
    assert first == [cut_at if isinstance(b, Skipped) else len(b["input_ids"]) for b in built]
    no_counting(monkeypatch)
    assert dataset(cut_at).token_lengths().tolist() == first
