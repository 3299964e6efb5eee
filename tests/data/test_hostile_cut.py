"""A record whose cut to data.max_seq_len falls in its image tokens cannot train: an error in
`data check` (dropped by --write-clean), a record that `data.on_error: skip` skips in training."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import byte_tokenizer, image_id
from PIL import Image

from llavactl.config.schema import DataConfig
from llavactl.data.check import check_dataset, write_clean
from llavactl.data.dataset import Collator, build_dataset, take_skipped
from llavactl.data.images import ImageSpec
from llavactl.data.source import open_source
from llavactl.data.tokens import TokenContext

SPEC = ImageSpec(32, 8, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
MAX_LEN = 256  # 30 images of 16 tokens do not fit


def data(folder: Path) -> Path:
    Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / "ok.png")
    convo = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A square."}]
    records = [
        {"id": "fits", "image": "ok.png", "conversations": convo},
        {"id": "cut", "image": ["ok.png"] * 30, "conversations": convo},
        {"id": "long-text", "image": "ok.png", "conversations": [convo[0], {"from": "gpt", "value": " a" * 200}]},
    ]
    path = folder / "d.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_data_check_makes_a_cut_in_image_tokens_an_error_and_write_clean_drops_it(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    tokens = TokenContext(tok, image_id(tok), SPEC)
    report, raws = check_dataset(data(tmp_path), tmp_path, "vicuna_v1", MAX_LEN, tokens)
    found = {(p.id, p.code, p.severity) for p in report.problems}
    assert found == {("cut", "too_long", "error"), ("long-text", "too_long", "warning")}
    assert "the cut falls in an image's tokens" in next(p.message for p in report.problems if p.id == "cut")
    out = tmp_path / "clean.json"
    assert write_clean(raws, report, out) == 2
    assert [r["id"] for r in json.loads(out.read_text(encoding="utf-8"))] == ["fits", "long-text"]


def test_training_skips_it_under_on_error_skip(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    config = DataConfig(data_path=str(data(tmp_path)), max_seq_len=MAX_LEN, on_error="skip")
    ds = build_dataset(open_source(config, 0), config, tok, image_id(tok), SPEC)
    batch = Collator(0)([ds[0], ds[1], ds[2]])
    assert [(s.id, s.code) for s in take_skipped(batch, "skip")] == [("cut", "too_long")]
    assert batch["input_ids"].shape[0] == 2
