"""Images too big by their header: refused from the header, with their own codes, in every path.

A 65-byte PNG can declare 30000x30000 pixels (a decompression bomb), and a harmless-looking
20000x10 strip becomes a 20000 px square under `pad`: both are bad records, never an internal error.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from helpers import run_cli
from PIL import Image

from llavactl.config.schema import DataConfig
from llavactl.data.check import check_dataset
from llavactl.data.dataset import Collator, build_dataset, take_skipped
from llavactl.data.images import DEFAULT_LIMITS, ImageFileError, ImageLimits, ImageSpec, load_image, open_rgb, probe
from llavactl.data.source import open_source
from llavactl.errors import DataError

SPEC = ImageSpec(32, 8, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels and holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def turns(image: str, rid: str) -> dict[str, object]:
    convo = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A strip."}]
    return {"id": rid, "image": image, "conversations": convo}


def hostile_folder(folder: Path) -> Path:
    png_header_only(folder / "bomb.png", 30000, 30000)
    Image.new("RGB", (2000, 10), (1, 2, 3)).save(folder / "strip.png")
    Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / "ok.png")
    records = [turns("bomb.png", "bomb"), turns("strip.png", "strip"), turns("ok.png", "ok")]
    path = folder / "d.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_a_decompression_bomb_is_image_too_large_from_its_header(tmp_path: Path) -> None:
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    for read in (probe, open_rgb):
        with pytest.raises(ImageFileError) as caught:
            read(bomb)
        assert caught.value.code == "image_too_large"
        assert "900,000,000 pixels" in caught.value.message and "data.max_image_pixels" in caught.value.message


def test_pixels_under_pils_own_limit_are_judged_by_ours(tmp_path: Path) -> None:
    # 12000x8000 = 96 M pixels: above PIL's warning line, below its error line.
    big = png_header_only(tmp_path / "big.png", 12000, 8000)
    with pytest.raises(ImageFileError, match=r"12000x8000 = 96,000,000 pixels \(0.27 GiB decoded\)") as caught:
        probe(big)
    assert caught.value.code == "image_too_large"
    assert probe(big, ImageLimits(max_pixels=96_000_000)) == (12000, 8000)


def test_a_limit_above_pils_raises_pils_and_never_lowers_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    assert probe(bomb, ImageLimits(max_pixels=10**9)) == (30000, 30000)
    assert Image.MAX_IMAGE_PIXELS == 10**9
    with pytest.raises(ImageFileError, match=r"over data\.max_image_pixels=100"):
        probe(bomb, ImageLimits(max_pixels=100))
    assert Image.MAX_IMAGE_PIXELS == 10**9


def test_extreme_aspect_ratios_are_refused_before_decoding(tmp_path: Path) -> None:
    strip = tmp_path / "strip.png"
    Image.new("RGB", (10, 2000)).save(strip)
    with pytest.raises(ImageFileError, match=r"10x2000, an aspect ratio of 200, over data\.max_image_aspect_ratio=20"):
        load_image(strip, SPEC, "pad")
    assert load_image(strip, SPEC, "pad", ImageLimits(max_aspect_ratio=200)).shape == (3, 32, 32)
    assert DEFAULT_LIMITS.max_aspect_ratio == 20


@pytest.mark.parametrize("decode", [False, True], ids=["header", "decode"])
def test_data_check_reports_both_codes_in_every_mode(tmp_path: Path, decode: bool) -> None:
    report, _ = check_dataset(hostile_folder(tmp_path), tmp_path, "vicuna_v1", 256, None, decode=decode, workers=2)
    assert {(p.index, p.code) for p in report.problems} == {(0, "image_too_large"), (1, "image_aspect_ratio")}
    assert report.bad_indices() == {0, 1}


def test_data_check_limits_come_from_the_caller(tmp_path: Path) -> None:
    limits = ImageLimits(max_pixels=1000, max_aspect_ratio=500)
    report, _ = check_dataset(hostile_folder(tmp_path), tmp_path, "vicuna_v1", 256, None, limits=limits)
    assert {(p.index, p.code) for p in report.problems} == {
        (0, "image_too_large"),
        (1, "image_too_large"),
        (2, "image_too_large"),
    }


def test_cli_data_check_exits_1_not_internal_error(tmp_path: Path) -> None:
    data = hostile_folder(tmp_path)
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "model:\n  model_name_or_path: builtin:tiny-llama\n  vision_tower: builtin:tiny-clip\n"
        f"data:\n  data_path: {data}\n  max_seq_len: 256\n",
        encoding="utf-8",
    )
    for extra in ([], ["--decode"]):
        code, out, err = run_cli(["data", "check", "-p", str(profile), "--workers", "1", *extra])
        assert code == 1, out + err
        assert "image_too_large" in out and "image_aspect_ratio" in out and "Internal error" not in err


def test_training_skips_such_records_under_on_error_skip(tmp_path: Path) -> None:
    from helpers import byte_tokenizer, image_id

    tok = byte_tokenizer()
    config = DataConfig(data_path=str(hostile_folder(tmp_path)), on_error="skip", max_seq_len=256)
    ds = build_dataset(open_source(config, 0), config, tok, image_id(tok), SPEC)
    batch = Collator(0)([ds[0], ds[1], ds[2]])
    skipped = take_skipped(batch, "skip")
    assert [(s.id, s.code) for s in skipped] == [("bomb", "image_too_large"), ("strip", "image_aspect_ratio")]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_profile_keys_set_the_dataset_limits(tmp_path: Path) -> None:
    config = DataConfig(data_path="x.json", max_image_pixels=5000, max_image_aspect_ratio=2.5)
    assert ImageLimits.of(config) == ImageLimits(5000, 2.5)


def test_a_named_pipe_or_a_device_named_as_an_image_is_refused_without_reading_it(tmp_path: Path) -> None:
    """Opening a named pipe blocks until a writer comes; /dev/zero never ends. Both are refused
    from their file type, in `data check`, in training's loader and in `data convert`."""
    import contextlib
    import os
    import threading

    from llavactl.data.convert import convert

    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    done = threading.Event()

    def unblock() -> None:  # were the pipe opened for reading, this ends the wait (and the test fails)
        while not done.wait(0.05):
            with contextlib.suppress(OSError):  # no reader yet
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    try:
        for reader in (probe, open_rgb):
            with pytest.raises(ImageFileError, match=r"pipe\.png is a named pipe, not an image file") as e:
                reader(pipe)
            assert e.value.code == "corrupt_image"
        with pytest.raises(ImageFileError, match=r"image file /dev/zero is a device, not an image file"):
            open_rgb(Path("/dev/zero"))
        records = tmp_path / "d.json"
        records.write_text(json.dumps([turns("pipe.png", "p"), turns("/dev/zero", "z")]), encoding="utf-8")
        report, _ = check_dataset(records, tmp_path, "vicuna_v1", 256, None)
        assert {(p.index, p.code) for p in report.problems} == {(0, "corrupt_image"), (1, "corrupt_image")}
        with pytest.raises(DataError, match=r"record 0 \(id 'p'\): corrupt_image: .* is a named pipe"):
            convert(records, tmp_path, "jsonl", tmp_path / "out")
        assert not (tmp_path / "out").exists()
    finally:
        done.set()


def test_convert_refuses_what_data_check_refuses_of_images(tmp_path: Path) -> None:
    """Markers that do not match the images, an image without a readable header, one over the limits:
    a shard written from them would only fail later, on the cluster."""
    from llavactl.data.convert import convert

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "text.png").write_text("not an image", encoding="utf-8")
    png_header_only(tmp_path / "bomb.png", 30000, 30000)
    two_markers = turns("ok.png", "m")
    two_markers["conversations"][0]["value"] = "<image>\n<image>\nWhat is it?"  # type: ignore[index]
    cases = {
        "image_token_mismatch: 2 `<image>` marker": two_markers,
        "corrupt_image: image file .*text.png has no readable image header": turns("text.png", "t"),
        "image_too_large": turns("bomb.png", "b"),
    }
    for k, (found, record) in enumerate(cases.items()):
        records = tmp_path / f"d{k}.json"
        records.write_text(json.dumps([turns("ok.png", "good"), record]), encoding="utf-8")
        with pytest.raises(DataError, match=rf"record 1 .*{found}"):
            convert(records, tmp_path, "parquet", tmp_path / f"out{k}")
