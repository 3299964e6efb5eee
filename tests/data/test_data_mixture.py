"""Mixtures of several sources (a YAML of LLaVA-NeXT's form): sampling forms, image folders, counts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import record, run_cli, train_recipe

from llavactl.data.mixture import MixtureStore, select
from llavactl.data.source import open_records
from llavactl.errors import DataError


@pytest.fixture
def mixture(shapes_data: Callable[..., Path], tmp_path: Path) -> Path:
    """Two sources: the 16 shapes records (images under their own folder, given per source) and 10
    text-only records, the first with `first:50%`, the second with `random:4`."""
    shapes = shapes_data(16)
    shutil.copytree(shapes.parent, tmp_path / "shapes")
    texts = [record(("human", f"Question {k}?"), ("gpt", f"Answer {k}."), rid=f"t{k}") for k in range(10)]
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps(r) for r in texts))
    path = tmp_path / "mix.yaml"
    path.write_text(
        "seed: 3\n"
        "datasets:\n"
        f"  - json_path: shapes/{shapes.name}\n"
        "    image_folder: shapes\n"
        '    sampling_strategy: "first:50%"\n'
        "  - json_path: texts.jsonl\n"
        '    sampling_strategy: "random:4"\n'
    )
    return path


def test_sampling_forms_take_what_they_say() -> None:
    import random

    rng = random.Random(0)
    assert select("all", 5, rng, "x").tolist() == [0, 1, 2, 3, 4]
    assert select("first:10%", 95, rng, "x").tolist() == list(range(10))  # rounded up
    assert select("end:3", 10, rng, "x").tolist() == [7, 8, 9]
    assert select("end:50%", 10, rng, "x").tolist() == [5, 6, 7, 8, 9]
    picked = select("random:50%", 10, random.Random(1), "x")
    assert len(picked) == 5 and len(set(picked.tolist())) == 5 and picked.tolist() == sorted(picked.tolist())
    assert np.array_equal(picked, select("random:50%", 10, random.Random(1), "x"))  # seeded
    assert select("first:500", 10, rng, "x").tolist() == list(range(10))  # at most the whole source
    for bad in ("first", "top:5", "random:-1", "first:150%"):
        with pytest.raises(DataError, match="sampling_strategy"):
            select(bad, 10, rng, "mix.yaml datasets[0]")


def test_a_mixture_reads_its_sources_with_their_own_image_folders(mixture: Path) -> None:
    store = open_records(mixture)
    assert isinstance(store, MixtureStore) and len(store) == 8 + 4
    first = store.raw(0).value
    assert Path(first["image"]).is_absolute() and Path(first["image"]).is_file()  # under the source's folder
    ids = [store.raw(i).value["id"] for i in range(len(store))]
    assert ids[:8] == [f"shapes-{k:06d}" for k in range(8)]
    assert ids == [open_records(mixture).raw(i).value["id"] for i in range(len(store))]  # same picks every time
    assert all(i.startswith("t") for i in ids[8:]) and len(set(ids[8:])) == 4
    assert store.where(9).startswith("texts.jsonl record ")
    assert [c["records"] for c in store.counts()] == [8, 4] and [c["of"] for c in store.counts()] == [16, 10]


def test_check_dry_run_and_train_report_per_source_counts(mixture: Path, tmp_path: Path) -> None:
    data = [f"data.data_path={mixture}", "data.eval_data_path=null"]
    code, out, _ = run_cli(["data", "check", "--profile", "tiny", *data, "--json"])
    assert code == 0, out
    sources = json.loads(out)["stats"]["sources"]
    assert [(Path(s["path"]).name, s["records"], s["of"], s["sampling"]) for s in sources] == [
        ("shapes.json", 8, 16, "first:50%"),
        ("texts.jsonl", 4, 10, "random:4"),
    ]
    code, out, _ = run_cli(["dry-run", "--profile", "tiny", *data])
    assert code == 0 and "sources: shapes.json 8 of 16 (first:50%); texts.jsonl 4 of 10 (random:4)" in out
    result, said = train_recipe([*data, f"training.output_dir={tmp_path / 'run'}", "training.max_steps=2"])
    assert result.status == "completed"
    assert "12 records from" in said and "(shapes.json 8 of 16 (first:50%); texts.jsonl 4 of 10 (random:4))" in said


@pytest.mark.parametrize(
    ("text", "said", "fix"),
    [
        ("datasets:\n  - sampling_strategy: all\n", "datasets[0] names no data file", "json_path: FILE"),
        (
            "datasets:\n  - json_path: missing.json\n",
            "datasets[0]: json_path {d}/missing.json does not exist",
            "the mixture file's folder, {d}",
        ),
        ("datasets:\n  - json_path: a.json\n    image_folder: [a, b]\n", "image_folder must be a path", ""),
        # A misspelt key would otherwise take every record of the source.
        (
            "datasets:\n  - json_path: a.json\n    sampling_stratgy: first:1\n",
            "unknown key 'sampling_stratgy'",
            "did you mean `sampling_strategy`?",
        ),
        ("datasets:\n  - json_path: a.json\n    path: a.json\n", "names its data file twice (json_path, path)", ""),
        ("seed: true\ndatasets:\n  - json_path: a.json\n", "`seed` must be an integer, got True", ""),
        ("datasets:\n  - json_path: empty.json\n", "datasets[0]: {d}/empty.json holds no records", "drop it"),
        (
            "datasets:\n  - json_path: a.json\n    sampling_strategy: first:0%\n",
            "sampling_strategy 'first:0%' takes none of the 1 records of a.json",
            "at least one record",
        ),
        # YAML aliases nest a 10-item list 8 levels deep in 600 bytes: the message quotes an excerpt.
        (
            "datasets:\n  - json_path: a.json\n    sampling_strategy: [&a0 [x,x,x,x,x,x,x,x,x,x]"
            + "".join(f", &a{k} [" + ",".join([f"*a{k - 1}"] * 10) + "]" for k in range(1, 8))
            + "]\n",
            "sampling_strategy must be text",
            "first:10%",
        ),
    ],
    ids=["no-file", "missing", "folder", "typo", "twice", "bool-seed", "empty", "takes-none", "alias-bomb"],
)
def test_a_broken_mixture_is_one_paragraph(tmp_path: Path, text: str, said: str, fix: str) -> None:
    convo = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    (tmp_path / "a.json").write_text(json.dumps([{"id": "a", "conversations": convo}]), encoding="utf-8")
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    path = tmp_path / "mix.yaml"
    path.write_text(text, encoding="utf-8")
    code, _, err = run_cli(["data", "check", "--profile", "tiny", f"data.data_path={path}"])
    assert code == 2, err
    assert len(err) < 1000 and "Traceback" not in err
    flat = " ".join(err.split())
    assert said.format(d=tmp_path) in flat and fix.format(d=tmp_path) in flat


def test_random_picks_draw_with_the_file_s_seed_else_the_profile_s(mixture: Path, tmp_path: Path) -> None:
    from helpers import byte_tokenizer, image_id

    from llavactl.config.schema import DataConfig
    from llavactl.data.dataset import build_dataset
    from llavactl.data.images import ImageSpec
    from llavactl.data.source import open_source

    def picked(path: Path, seed: int) -> list[str]:
        store = open_records(path, seed)
        return [store.raw(i).value["id"] for i in range(8, len(store))]  # the `random:4` source

    # The file's own `seed: 3` wins over any profile's.
    assert picked(mixture, 1) == picked(mixture, 2) == picked(mixture, 3)
    unseeded = tmp_path / "unseeded.yaml"
    unseeded.write_text(mixture.read_text().replace("seed: 3\n", ""))
    by_seed = {seed: picked(unseeded, seed) for seed in (1, 2, 3)}
    assert by_seed[3] == picked(mixture, 0) and by_seed[1] != by_seed[2]
    assert picked(unseeded, 1) == by_seed[1]  # the same profile seed, the same picks
    # The dataset a run trains on draws with the run's seed.
    tok = byte_tokenizer()
    spec = ImageSpec(32, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    dataset = build_dataset(
        open_source(DataConfig(data_path=str(unseeded)), 2),
        DataConfig(data_path=str(unseeded)),
        tok,
        image_id(tok),
        spec,
    )
    assert [dataset.store.raw(i).value["id"] for i in range(8, 12)] == by_seed[2]
