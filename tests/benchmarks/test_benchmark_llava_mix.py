"""benchmarks/make_llava_mix.py: a data set shaped like LLaVA-1.5's 665K mix, deterministic, every image there."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from helpers import run_cli

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "make_llava_mix.py"
SUFFIX = "Answer the question using a single word or phrase."


def _make(out: Path, fraction: str = "0.002") -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--fraction", fraction], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_mix_has_the_real_shape_and_every_image_exists(tmp_path: Path) -> None:
    figures = _make(tmp_path / "a")
    records = json.loads(Path(figures["path"]).read_text())
    assert len(records) == figures["records"] == 1_330  # 0.2% of each source of the 665,298, rounded
    text_only = [r for r in records if "image" not in r]
    assert len(text_only) == figures["text_only"] == 81  # ShareGPT's share, ~6%
    folders = {r["image"].rsplit("/", 1)[0] for r in records if "image" in r}
    assert folders == {
        "coco/train2017",
        "gqa/images",
        "ocr_vqa/images",
        "textvqa/train_images",
        "vg/VG_100K",
        "vg/VG_100K_2",
    }
    assert all((tmp_path / "a" / r["image"]).is_file() for r in records if "image" in r)
    first_turns = [r["conversations"][0]["value"] for r in records]
    assert sum(SUFFIX in t for t in first_turns) > 300  # VQAv2, GQA, OKVQA, OCR-VQA
    assert any("bounding box coordinate" in t for t in first_turns)  # RefCOCO
    assert any("Answer with the option's letter" in t for t in first_turns)  # A-OKVQA
    assert Path(figures["path"]).read_text().startswith('[\n  {\n    "id": ')  # indent 2, as the real file


def test_the_same_seed_gives_the_same_file_and_the_set_checks_clean(tmp_path: Path, capsys) -> None:
    a, b = _make(tmp_path / "a"), _make(tmp_path / "b")
    digest = [hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() for f in (a, b)]
    assert digest[0] == digest[1]
    code, out, err = run_cli(
        [
            "data",
            "check",
            "-p",
            "tiny",
            f"data.data_path={a['path']}",
            f"data.image_folder={tmp_path / 'a'}",
            "data.max_seq_len=4096",
            "--workers",
            "1",
        ],
        capsys,
    )
    assert code == 0, out + err
    assert "1330 records" in out.replace(",", "")
