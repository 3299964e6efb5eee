"""`data.image_size` other than the tower's own: fewer image tokens everywhere, interpolated position
embeddings, exact resume, and an export that plain transformers runs at that size.

The tower here is a CLIP folder made for 32 px images (16 patches of 8 px), so 16 px images give 4
image tokens and 24 px give 9, through transformers' `interpolate_pos_encoding` as with a 336 px
tower trained at 224 px. (A builtin tower is simply built at the requested size.)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import run_cli, train_recipe

from llavactl.cli._errors import run_guarded
from llavactl.cli.main import app
from llavactl.config.loader import load_profile
from llavactl.data.dataset import Collator, build_dataset
from llavactl.data.source import open_source
from llavactl.errors import CheckFailed
from llavactl.model import builtin
from llavactl.model.assembly import AssembledModel, build_llava
from llavactl.model.export import batch_logits, max_difference
from llavactl.model.towers import resize_position_table
from llavactl.plan import build as plan
from llavactl.train.recipe import TrainResult


@pytest.fixture(scope="module")
def shapes12(shapes_data: Callable[..., Path]) -> Path:
    return shapes_data(12)


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tower")
    CLIPVisionModel(builtin.tower_config("tiny-clip")).save_pretrained(folder)
    return folder


def overrides(shapes12: Path, tower: Path, *extra: str) -> list[str]:
    return [f"data.data_path={shapes12}", f"data.eval_data_path={shapes12}", f"model.vision_tower={tower}", *extra]


def assemble(shapes12: Path, tower: Path, *extra: str) -> tuple[AssembledModel, dict[str, torch.Tensor]]:
    profile = load_profile("tiny", overrides(shapes12, tower, *extra)).profile
    assembled = build_llava(profile.model, profile.stage, image_size=profile.data.image_size, seed=profile.seed)
    dataset = build_dataset(
        open_source(profile.data, 0), profile.data, assembled.tokenizer, assembled.image_token_id, assembled.image_spec
    )
    return assembled, Collator(assembled.tokenizer.pad_token_id)([dataset[i] for i in range(3)])


def image_tokens_per_record(assembled: AssembledModel, batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["input_ids"] == assembled.image_token_id).sum(dim=1).tolist()


def test_image_size_sets_the_image_tokens_of_batches_data_check_and_the_plan(
    shapes12: Path, tower: Path, tmp_path: Path
) -> None:
    native, native_batch = assemble(shapes12, tower)
    small, small_batch = assemble(shapes12, tower, "data.image_size=16")
    assert (native.image_spec.num_tokens, small.image_spec.num_tokens) == (16, 4)
    assert image_tokens_per_record(native, native_batch) == [16, 16, 16]
    assert image_tokens_per_record(small, small_batch) == [4, 4, 4]
    assert small_batch["pixel_values"].shape[1:] == (3, 16, 16)
    # transformers' LLaVA checks that the image features fill exactly the image tokens.
    assert torch.isfinite(small.model(**small_batch).loss)

    reports = {}
    for size in ("null", "16"):
        report = tmp_path / f"check-{size}.json"
        args = ["data", "check", "--profile", "tiny", *overrides(shapes12, tower, f"data.image_size={size}")]
        code, out, err = run_cli([*args, "--json-file", str(report)])
        assert code == 0, out + err
        reports[size] = json.loads(report.read_text())["stats"]["length"]
    assert reports["null"]["max"] - reports["16"]["max"] == 16 - 4
    assert reports["null"]["min"] - reports["16"]["min"] == 16 - 4

    for size, per_image in ((None, 16), (16, 4), (24, 9)):
        profile = load_profile("tiny", overrides(shapes12, tower, f"data.image_size={size or 'null'}")).profile
        tokens = plan.token_plan(profile, plan.build_meta(profile, gradient_checkpointing=False))
        assert tokens.image_tokens_per_image == per_image
        assert tokens.longest == reports["null"]["max"] - (16 - per_image)


def _train(shapes12: Path, tower: Path, output_dir: Path, *extra: str, resume: str | None = None) -> TrainResult:
    settings = overrides(
        shapes12,
        tower,
        f"training.output_dir={output_dir}",
        "training.per_device_train_batch_size=2",
        "training.max_steps=6",
        "training.save_steps=3",
        "training.logging_steps=1",
        "training.warmup_ratio=null",
        "training.learning_rate=1e-2",
        *extra,
    )
    return train_recipe(settings, resume=resume)[0]


@pytest.mark.parametrize("size", [16, 24])
def test_interpolated_sizes_train_and_resume_exactly(shapes12: Path, tower: Path, tmp_path: Path, size: int) -> None:
    # The tower is trained too, so that its interpolated position embeddings get gradients.
    extra = (f"data.image_size={size}", "model.freeze_vision_tower=false")
    whole = _train(shapes12, tower, tmp_path, *extra)
    assert whole.status == "completed" and len(whole.losses) == 6
    assert whole.losses[-1] < whole.losses[0]
    shutil.rmtree(tmp_path / "checkpoint-6")
    resumed = _train(shapes12, tower, tmp_path, *extra, resume=str(tmp_path / "checkpoint-3"))
    assert resumed.losses == whole.losses[3:]


def test_resume_at_another_image_size_is_refused_with_the_difference(
    shapes12: Path, tower: Path, tmp_path: Path
) -> None:
    _train(shapes12, tower, tmp_path, "data.image_size=16", "training.max_steps=3")
    with pytest.raises(CheckFailed, match=r"data.image_size: 16 -> 24"):
        _train(shapes12, tower, tmp_path, "data.image_size=24", "training.max_steps=3", resume="auto")


def test_resized_position_table_computes_what_interpolation_computes(shapes12: Path, tower: Path) -> None:
    from transformers import CLIPVisionModel

    interpolating = CLIPVisionModel.from_pretrained(tower).eval()
    resized = CLIPVisionModel.from_pretrained(tower).eval()
    resize_position_table(resized, 16)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="doesn't match model"):
        interpolating(pixels)  # transformers refuses another size unless asked to interpolate
    expected = interpolating(pixels, interpolate_pos_encoding=True).last_hidden_state
    assert resized.config.image_size == 16 and resized.embeddings.position_ids.shape == (1, 5)
    assert torch.equal(resized(pixels).last_hidden_state, expected)


def test_export_at_a_smaller_image_size_runs_in_plain_transformers_with_equal_logits(
    shapes12: Path, tower: Path, tmp_path: Path
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavactl.model.weights import save_trainable
    from llavactl.train.checkpoint import save_checkpoint

    assembled, batch = assemble(shapes12, tower, "data.image_size=16")
    profile = load_profile("tiny", overrides(shapes12, tower, "data.image_size=16")).profile
    save_checkpoint(
        tmp_path / "run",
        1,
        write_weights=lambda folder: save_trainable(assembled, folder),
        training_state={},
        progress={"step": 1, "profile": profile.model_dump(mode="json")},
        save_total_limit=None,
    )
    with pytest.raises(SystemExit) as info:
        run_guarded(lambda: app(["export", str(tmp_path / "run"), str(tmp_path / "out")], prog_name="llavactl"))
    assert info.value.code in (0, None)

    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert exported.config.vision_config.image_size == 16
    assembled.model.eval()
    difference = max_difference(
        batch_logits(exported, batch), batch_logits(assembled.model, batch), batch["attention_mask"]
    )
    assert difference <= 1e-5
    # Its processor makes 16 px pixels and 4 image tokens per image, as training did.
    from PIL import Image

    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=Image.open(shapes12.parent / "images" / "000000.png"), return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 16, 16)
    assert int((inputs["input_ids"] == exported.config.image_token_id).sum()) == 4
    with torch.no_grad():
        exported(**inputs)  # runs without being asked to interpolate
