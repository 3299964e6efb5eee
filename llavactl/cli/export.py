"""`llavactl export | predict | eval`: take a trained model out of llavactl, ask it, and score it.

Each command takes a model as a run folder (its latest checkpoint), a checkpoint folder, or (predict
and eval) a folder written by `llavactl export`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llavactl.cli._common import OverridesArg, ProfileOpt, console, load
from llavactl.errors import DataError, ModelSourceError

if TYPE_CHECKING:
    import torch

    from llavactl.config.schema import DataConfig, Profile
    from llavactl.model.assembly import AssembledModel
    from llavactl.train.generate import Predictor

PARITY_RECORDS = 4

ModelArg = Annotated[
    Path,
    typer.Argument(help="A run folder (its latest checkpoint is used) or a checkpoint-N folder.", show_default=False),
]
ModelOpt = Annotated[
    Path,
    typer.Option(
        "--model",
        help="An exported folder, a run folder (its latest checkpoint) or a checkpoint-N folder.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text, for scripts.")]


def _checkpoint_folder(path: Path) -> Path:
    """``path`` itself when it is a checkpoint, else the latest checkpoint of the run folder ``path``."""
    from llavactl.train.checkpoint import PREFIX, STATE_FILE, checkpoint_step, latest_checkpoint

    if checkpoint_step(path) is not None:
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ModelSourceError(
            f"`{path}` is neither a llavactl checkpoint (a `{PREFIX}<step>` folder with {STATE_FILE}), nor a run "
            "folder holding one, nor a folder written by `llavactl export`.",
            fix="pass a run folder (training.output_dir) or one of its checkpoint folders",
        )
    return latest


def _saved_profile(saved: dict, where: Path) -> Profile:
    from pydantic import ValidationError

    from llavactl.config.schema import Profile

    try:
        return Profile.model_validate(saved)
    except ValidationError as exc:
        raise ModelSourceError(
            f"The profile saved in `{where}` does not validate with this llavactl version: {exc.errors()[0]['msg']}.",
            fix="use the llavactl version that trained the checkpoint",
        ) from exc


def _load_checkpoint(path: Path) -> tuple[AssembledModel, Profile, Path]:
    """The model of a checkpoint (or a run's latest), rebuilt from its saved profile, in eval mode."""
    from llavactl.model.assembly import build_llava
    from llavactl.model.export import inference_stage
    from llavactl.model.weights import load_trainable
    from llavactl.train.checkpoint import STATE_FILE, read_progress

    folder = _checkpoint_folder(path)
    profile = _saved_profile(read_progress(folder)["profile"], folder / STATE_FILE)
    assembled = build_llava(
        profile.model, inference_stage(profile.stage), image_size=profile.data.image_size, seed=profile.seed
    )
    load_trainable(assembled, folder)
    assembled.model.eval()
    return assembled, profile, folder


def _predictor(path: Path, data: DataConfig | None = None) -> Predictor:
    """A predictor for an exported folder, a run folder or a checkpoint; it asks questions with
    ``data``'s template and image settings, by default those the model was trained with."""
    from llavactl.data.images import ImageSpec
    from llavactl.model.export import MANIFEST, load_exported_model, read_manifest
    from llavactl.train.generate import Predictor

    manifest = read_manifest(path)
    if manifest is None:
        assembled, profile, _ = _load_checkpoint(path)
        model = assembled.peft_model if assembled.peft_model is not None else assembled.model
        spec, tokenizer, token_id = assembled.image_spec, assembled.tokenizer, assembled.image_token_id
        return Predictor(model, tokenizer, token_id, spec, data or profile.data)
    from transformers import AutoProcessor

    profile = _saved_profile(manifest["profile"], path / MANIFEST)
    processor = AutoProcessor.from_pretrained(path)
    saved = manifest["image_spec"]
    spec = ImageSpec(saved["size"], saved["patch_size"], tuple(saved["mean"]), tuple(saved["std"]))
    model = load_exported_model(path)
    return Predictor(model, processor.tokenizer, processor.image_token_id, spec, data or profile.data)


def _parity_batch(assembled: AssembledModel, profile: Profile) -> dict[str, torch.Tensor]:
    """The first records of the training data, prepared and collated by llavactl's data pipeline."""
    from llavactl.data.dataset import Collator, Skipped, build_dataset

    dataset = build_dataset(
        profile.data, assembled.tokenizer, assembled.image_token_id, assembled.image_spec, profile.seed
    )
    items = [item for i in range(len(dataset)) if not isinstance(item := dataset[i], Skipped)][:PARITY_RECORDS]
    if not items:
        raise DataError(
            f"No record of {profile.data.data_path} can be prepared, so the export cannot be checked on real data.",
            fix=f"run `llavactl data check` on {profile.data.data_path}",
        )
    return Collator(assembled.tokenizer.pad_token_id)(items)


def export(
    model: ModelArg,
    out_dir: Annotated[Path, typer.Argument(help="A new or empty folder to write.", show_default=False)],
    *,
    merge_lora: Annotated[
        bool, typer.Option("--merge-lora", help="Merge LoRA adapters into the LLM instead of writing them beside it.")
    ] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Weight precision of the export: fp32, bf16 or fp16.")] = "fp32",
    json_output: JsonOpt = False,
) -> None:
    """Write a transformers LLaVA folder (weights, processor, chat template) and check its logits."""
    from llavactl.model.export import build_processor, export_model
    from llavactl.train.generate import chat_template, stop_token_ids

    if dtype not in ("fp32", "bf16", "fp16"):
        raise typer.BadParameter(f"--dtype must be fp32, bf16 or fp16, not {dtype!r}")
    assembled, profile, folder = _load_checkpoint(model)
    data, spec = profile.data, assembled.image_spec
    template = chat_template(data.conversation_template, assembled.tokenizer)
    has_cls = assembled.model.config.vision_feature_select_strategy == "default"
    processor = build_processor(assembled.tokenizer, spec, data.image_aspect_ratio, template, has_cls_token=has_cls)
    manifest = {
        "source": str(folder.resolve()),
        "profile": profile.model_dump(mode="json"),
        "image_spec": {"size": spec.size, "patch_size": spec.patch_size, "mean": spec.mean, "std": spec.std},
    }
    result = export_model(
        assembled,
        processor,
        out_dir,
        _parity_batch(assembled, profile),
        manifest=manifest,
        stop_ids=stop_token_ids(data.conversation_template, assembled.tokenizer),
        merge_lora=merge_lora,
        dtype=dtype,  # type: ignore[arg-type]  # checked above
    )
    if json_output:
        print(json.dumps(result.as_json(), indent=2))
        return
    console.print(f"Exported {folder} to {out_dir} ({dtype}).", soft_wrap=True)
    if result.merge_logit_difference is not None:
        console.print(
            f"LoRA merged: logits differ from the unmerged model by at most {result.merge_logit_difference:.2e}."
        )
    if result.adapter is not None:
        console.print(f"LoRA adapter (peft) in {result.adapter}; the base model beside it.", soft_wrap=True)
    console.print(
        f"Reloaded with transformers: logits within {result.max_logit_difference:.2e} of llavactl's model "
        f"on {PARITY_RECORDS} records (tolerance 1e-05, fp32).",
        soft_wrap=True,
    )


def predict(
    *,
    model: ModelOpt,
    image: Annotated[Path, typer.Option("--image", help="The image to ask about.", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", help="The question.")] = "Describe the image.",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest answer in tokens.")] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 picks the likeliest token.")
    ] = 0.0,
    json_output: JsonOpt = False,
) -> None:
    """Answer a question about an image with the model's conversation template, streaming the tokens."""
    from transformers import TextStreamer

    from llavactl.data.images import ImageFileError, open_rgb

    try:
        open_rgb(image)
    except ImageFileError as exc:
        raise DataError(f"--image: {exc.message}", fix="pass a readable image file (PNG, JPEG, ...)") from exc
    predictor = _predictor(model)
    streamer = None if json_output else TextStreamer(predictor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    prediction = predictor.predict(
        image, prompt, max_new_tokens=max_new_tokens, temperature=temperature, streamer=streamer
    )
    if json_output:
        fields = {"model": str(model), "image": str(image), "prompt": prompt, "answer": prediction.text}
        fields.update(new_tokens=prediction.new_tokens, prompt_tokens=prediction.prompt_tokens)
        print(json.dumps(fields, indent=2, ensure_ascii=False))


def evaluate(
    overrides: OverridesArg = None,
    *,
    profile: ProfileOpt,
    model: ModelOpt,
    json_output: JsonOpt = False,
) -> None:
    """Loss and perplexity on the profile's held-out records (data.eval_data_path); on shapes data,
    also the share of answers naming the right colour and shape."""
    from llavactl.train.evaluate import evaluate as run_evaluation

    loaded = load(profile, overrides)
    predictor = _predictor(model, loaded.profile.data)
    report = run_evaluation(
        predictor,
        loaded.profile.data,
        seed=loaded.profile.seed,
        batch_size=loaded.profile.training.per_device_train_batch_size,
    )
    if json_output:
        print(json.dumps(report.as_json(), indent=2))
        return
    console.print(
        f"{report.records} held-out records ({report.supervised_tokens} supervised tokens, {report.skipped} skipped): "
        f"loss {report.loss:.4f}, perplexity {report.perplexity:.3f}",
        soft_wrap=True,
    )
    for name, score in (("colour", report.colour), ("shape", report.shape)):
        if score is not None and score.share is not None:
            console.print(f"Right {name} named in {score.correct}/{score.asked} answers ({score.share:.1%})")
