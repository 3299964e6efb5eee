"""Dataset, collator and sampler: the batch contract, bad records, seeded and resumable order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REFERENCE, byte_tokenizer, image_id, record, write_json
from PIL import Image

from llavactl.config.schema import DataConfig
from llavactl.data.dataset import Collator, ResumableSampler, Skipped, build_dataset, take_skipped
from llavactl.data.images import ImageSpec
from llavactl.data.source import open_data_path, open_source
from llavactl.data.synth import COLOURS, write_shapes
from llavactl.data.templates import IGNORE_INDEX
from llavactl.errors import DataError

SPEC = ImageSpec(32, 8, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def dataset(path: Path, folder: Path, **data: object) -> object:
    tok = byte_tokenizer()
    config = DataConfig(data_path=str(path), image_folder=str(folder), **data)
    return build_dataset(open_source(config, 0), config, tok, image_id(tok), SPEC)


def test_real_records_batch_into_the_llava_contract() -> None:
    tok = byte_tokenizer()
    ds = dataset(REFERENCE / "llava_real_samples.json", REFERENCE, max_seq_len=4096)
    items = [ds[1], ds[9], ds[3]]  # image, text-only, image
    batch = Collator(tok.pad_token_id)(items)
    longest = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert (batch["input_ids"] == image_id(tok)).sum(dim=1).tolist() == [16, 0, 16]
    n = len(items[1]["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (longest - n)
    assert (batch["input_ids"][1, n:] == tok.pad_token_id).all() and (batch["labels"][1, n:] == IGNORE_INDEX).all()
    assert (batch["labels"][batch["input_ids"] == image_id(tok)] == IGNORE_INDEX).all()


def test_text_only_batch_has_no_pixel_values() -> None:
    ds = dataset(REFERENCE / "llava_real_samples.json", REFERENCE, max_seq_len=4096)
    assert "pixel_values" not in Collator(0)([ds[9]])


def bad_data(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    return write_json(
        tmp_path / "d.json",
        [
            record(("human", "q"), ("gpt", "a"), image="ok.png", rid="good"),
            record(("human", "q"), ("gpt", "a"), image="gone.png", rid="lost"),
        ],
    )


def test_bad_record_in_training_is_an_error_naming_it(tmp_path: Path) -> None:
    ds = dataset(bad_data(tmp_path), tmp_path)
    batch = Collator(0)([ds[0], ds[1]])
    with pytest.raises(DataError, match=r"record 1 \(id 'lost'\): missing_image"):
        take_skipped(batch, "raise")


def test_bad_record_is_skipped_and_counted_never_replaced(tmp_path: Path) -> None:
    ds = dataset(bad_data(tmp_path), tmp_path, on_error="skip")
    batch = Collator(0)([ds[0], ds[1]])
    skipped = take_skipped(batch, "skip")
    assert [(s.index, s.id, s.code) for s in skipped] == [(1, "lost", "missing_image")]
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1
    assert Collator(0)([ds[1]]) == {"skipped": [Skipped(1, "lost", "missing_image", ds[1].message)]}


def test_dataloader_workers_return_the_same_batches() -> None:
    ds = dataset(REFERENCE / "llava_real_samples.json", REFERENCE, max_seq_len=4096)
    batches = []
    for workers in (0, 2):
        sampler = ResumableSampler(ds.modality_lengths(), 2, seed=3)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=2, sampler=sampler, collate_fn=Collator(0), num_workers=workers
        )
        batches.append([b["input_ids"] for b in loader])
    assert all(torch.equal(a, b) for a, b in zip(*batches, strict=True))


def test_sampler_is_seeded_per_epoch() -> None:
    a, b = ResumableSampler([1] * 20, 4, seed=7), ResumableSampler([1] * 20, 4, seed=7)
    assert list(a) == list(b) and sorted(a) == list(range(20))
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(ResumableSampler([1] * 20, 4, seed=8)) != list(a)


def test_sampler_resumes_exactly_from_a_saved_position() -> None:
    first = ResumableSampler([1] * 30, 4, seed=1)
    first.set_epoch(2)
    full = list(first)
    first.advance(12)
    state = first.state_dict()
    assert state == {"epoch": 2, "position": 12, "seed": 1, "order": 2}
    resumed = ResumableSampler([1] * 30, 4, seed=1)
    resumed.load_state_dict(state)
    assert list(resumed) == full[12:] and len(resumed) == 18
    with pytest.raises(DataError, match="seed 1"):
        ResumableSampler([1] * 30, 4, seed=2).load_state_dict(state)
    # A checkpoint of an earlier llavactl, whose order was drawn another way, is not resumed.
    with pytest.raises(DataError, match="another llavactl version") as e:
        resumed.load_state_dict({"epoch": 2, "position": 12, "seed": 1})
    assert "start the run anew" in (e.value.fix or "")


def test_modality_grouping_keeps_image_and_text_batches_apart() -> None:
    # Positive lengths are image records, negative text-only (LLaVA's convention).
    lengths = [10 + i for i in range(23)] + [-(5 + i) for i in range(13)]
    sampler = ResumableSampler(lengths, 4, seed=0, group_by_modality_length=True)
    order = list(sampler)
    assert sorted(order) == list(range(36))
    # 5 full image batches and 3 full text batches come first, shuffled; the 3 + 1 leftovers last.
    for k in range(0, 32, 4):
        assert len({lengths[i] > 0 for i in order[k : k + 4]}) == 1
    assert sum(lengths[i] > 0 for i in order[32:]) == 3 and len(order[32:]) == 4
    assert order == list(ResumableSampler(lengths, 4, seed=0, group_by_modality_length=True))


def test_builtin_shapes_is_generated_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAVACTL_CACHE", str(tmp_path))
    source = open_data_path("builtin:shapes", None, seed=5)
    records, folder = source.path, source.image_folder
    assert records.is_file() and (folder / "images" / "000000.png").is_file()
    stamp = records.stat().st_mtime_ns
    again = open_data_path("builtin:shapes", None, seed=5)
    assert (again.path, again.image_folder) == (records, folder)
    assert records.stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="unknown builtin"):
        open_data_path("builtin:nope", None, seed=5)


def test_shapes_are_deterministic_and_answers_match_the_pixels(tmp_path: Path) -> None:
    a = write_shapes(tmp_path / "a", n=20, seed=3, image_size=48)
    b = write_shapes(tmp_path / "b", n=20, seed=3, image_size=48)
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a/images/000007.png").read_bytes() == (tmp_path / "b/images/000007.png").read_bytes()
    for rec in json.loads(a.read_text()):
        img = Image.open(tmp_path / "a" / rec["image"]).convert("RGB")
        corner = img.getpixel((0, 0))
        answers = " ".join(t["value"] for t in rec["conversations"] if t["from"] == "gpt").lower()
        background = next(name for name, rgb in COLOURS.items() if rgb == corner)
        colours_in_image = {name for name, rgb in COLOURS.items() if rgb in {p for _, p in img.getcolors(4096)}}
        assert background in colours_in_image and len(colours_in_image) == 2
        mentioned = {name for name in COLOURS if name in answers}
        assert mentioned <= colours_in_image
