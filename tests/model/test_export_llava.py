"""`llavactl export`: a transformers LLaVA folder that reloads with the same logits, whatever the stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_run, run_cli
from PIL import Image

from llavactl.config.loader import load_profile
from llavactl.data.dataset import Collator, build_dataset
from llavactl.data.images import load_image
from llavactl.data.source import open_source
from llavactl.model.assembly import AssembledModel
from llavactl.model.export import batch_logits, max_difference
from llavactl.train.generate import Predictor


def real_batch(assembled: AssembledModel, shapes: Path) -> dict[str, torch.Tensor]:
    profile = load_profile("tiny", [f"data.data_path={shapes}"]).profile
    dataset = build_dataset(
        open_source(profile.data, 0), profile.data, assembled.tokenizer, assembled.image_token_id, assembled.image_spec
    )
    return Collator(assembled.tokenizer.pad_token_id)([dataset[i] for i in range(4)])


def test_full_stage_export_reloads_in_plain_transformers_with_the_same_logits(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assembled = make_run(tmp_path / "run", shapes)
    code, out, err = run_cli(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--json"], capsys)
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["max_logit_difference"] <= 1e-5 and report["adapter"] is None
    assert report["image_logit_difference"] > 1e-3  # the real images move the logits
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "processor_config.json",
        "chat_template.jinja",
        "tokenizer.json",
    } <= files
    assert not [f for f in files if f.endswith((".bin", ".pt"))]

    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.image_token_id == model.config.image_token_id == assembled.image_token_id
    batch = real_batch(assembled, shapes)
    difference = max_difference(
        batch_logits(model, batch), batch_logits(assembled.model, batch), batch["attention_mask"]
    )
    assert difference <= 1e-5


def test_merged_lora_gives_the_unmerged_logits_and_a_plain_llava_folder(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import LlavaForConditionalGeneration

    assembled = make_run(tmp_path / "run", shapes, "stage=lora")
    code, out, _ = run_cli(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--merge-lora", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["merged_lora"] is True
    assert report["merge_logit_difference"] <= 1e-5 and report["max_logit_difference"] <= 1e-5
    assert not (tmp_path / "out" / "adapter").exists()

    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    batch = real_batch(assembled, shapes)
    with_adapters = batch_logits(assembled.peft_model, batch)
    assert max_difference(batch_logits(merged, batch), with_adapters, batch["attention_mask"]) <= 1e-5
    with assembled.peft_model.disable_adapter():
        without = batch_logits(assembled.peft_model, batch)
    assert max_difference(without, with_adapters, batch["attention_mask"]) > 1e-3  # the adapters do matter


def test_unmerged_lora_writes_the_base_and_a_peft_adapter_beside_it(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    assembled = make_run(tmp_path / "run", shapes, "stage=lora")
    code, out, _ = run_cli(["export", str(tmp_path / "run" / "checkpoint-3"), str(tmp_path / "out")], capsys)
    assert code == 0
    assert "LoRA adapter (peft) in" in out and "logits within" in out
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert not any(".lora_" in name for name, _ in base.named_parameters())
    model = PeftModel.from_pretrained(base, adapter).eval()
    batch = real_batch(assembled, shapes)
    difference = batch_logits(model, batch) - batch_logits(assembled.peft_model, batch)
    assert difference.abs()[batch["attention_mask"].bool()].max() <= 1e-5


def test_bf16_export_stores_bf16_weights_and_checks_them_in_fp32(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import safe_open

    make_run(tmp_path / "run", shapes, "stage=projector")
    args = ["export", str(tmp_path / "run"), str(tmp_path / "out"), "--dtype", "bf16", "--json"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert json.loads(out)["max_logit_difference"] <= 1e-5
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (not a dict)


@pytest.mark.parametrize("aspect", ["pad", "resize"])
def test_exported_processor_prepares_a_question_as_llavactl_does(
    shapes: Path, tmp_path: Path, aspect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoProcessor

    assembled = make_run(tmp_path / "run", shapes, f"data.image_aspect_ratio={aspect}")
    # What an export killed mid-write left (its process is gone) is cleared by the next one.
    (tmp_path / ".out.partial-999999999").mkdir()
    assert run_cli(["export", str(tmp_path / "run"), str(tmp_path / "out")], capsys)[0] == 0
    assert not (tmp_path / ".out.partial-999999999").exists()
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    profile = load_profile("tiny", [f"data.image_aspect_ratio={aspect}"]).profile
    predictor = Predictor(
        assembled.model, assembled.tokenizer, assembled.image_token_id, assembled.image_spec, profile.data
    )
    # A wide image, so that padding to a square (or stretching) shows.
    image_path = tmp_path / "wide.png"
    Image.new("RGB", (60, 24), (200, 30, 30)).save(image_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=Image.open(image_path), return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == predictor.prompt_ids("What colour is it?", 1)
    ours = load_image(image_path, assembled.image_spec, aspect)
    # Both resize with antialiased bicubic on uint8 pixels; rounding differs by at most 2 grey levels.
    assert (inputs["pixel_values"][0] - ours).abs().max() <= 2.5 / (255 * min(assembled.image_spec.std))


def test_export_needs_a_checkpoint_and_an_empty_folder(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["export", str(tmp_path), str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.startswith(f"Error: `{tmp_path}` is neither a llavactl checkpoint")
    assert "Fix: pass a run folder" in err

    make_run(tmp_path / "run", shapes, "stage=projector")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    code, _, err = run_cli(["export", str(tmp_path / "run"), str(tmp_path / "busy")], capsys)
    assert code == 2 and "is not empty" in err and (tmp_path / "busy" / "keep.txt").read_text() == "x"


def test_a_failed_export_leaves_nothing_and_a_damaged_one_is_named_on_load(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk mid-export leaves no folder that predict or eval would take for an export; an
    export missing its config.json (transformers would build its 7B default) or with truncated
    weights is one paragraph naming the folder."""
    import errno

    from transformers import LlavaForConditionalGeneration

    make_run(tmp_path / "run", shapes)
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    save = LlavaForConditionalGeneration.save_pretrained

    def full_disk(self: LlavaForConditionalGeneration, folder: Path, **kwargs: object) -> None:
        save(self, folder, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(LlavaForConditionalGeneration, "save_pretrained", full_disk)
        code, _, err = run_cli(["export", str(tmp_path / "run"), str(tmp_path / "out")], capsys)
    assert code == 2 and f"Writing the export to `{tmp_path / 'out'}` failed: No space left on device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["red.png", "run"]  # no folder, no hidden partial one

    # What an export killed mid-write left (its process is gone) is cleared by the next one.
    (tmp_path / ".out.partial-999999999").mkdir()
    assert run_cli(["export", str(tmp_path / "run"), str(tmp_path / "out")], capsys)[0] == 0
    assert not (tmp_path / ".out.partial-999999999").exists()
    for damage, said in (
        (lambda out: (out / "config.json").unlink(), "has no config.json: the export is incomplete"),
        (lambda out: (out / "model.safetensors").write_bytes(b"\0" * 10), "cannot be loaded (SafetensorError"),
    ):
        damaged = tmp_path / f"damaged-{len(said)}"
        shutil.copytree(tmp_path / "out", damaged)
        damage(damaged)
        code, _, err = run_cli(
            ["predict", "--model", str(damaged), "--image", str(image), "--prompt", "What colour?"], capsys
        )
        assert code == 2 and f"The exported folder `{damaged}` {said}" in err, err
        assert "Fix: export the checkpoint again" in err


def test_an_export_whose_model_ignores_the_image_fails_and_leaves_nothing(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both the model in memory and the reloaded folder drop the tower's output: their logits agree,
    and only the comparison with blank images can tell."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    make_run(tmp_path / "run", shapes)
    monkeypatch.setattr(
        LlavaMultiModalProjector,
        "forward",
        lambda self, features: torch.zeros(*features.shape[:-1], self.linear_2.out_features),
    )
    code, _, err = run_cli(["export", str(tmp_path / "run"), str(tmp_path / "out")], capsys)
    said = " ".join(err.split())
    assert code == 1 and "The exported folder ignores the image" in said, said
    assert "differ by 0 at most" in said and "Fix:" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
