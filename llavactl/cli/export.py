"""`llavactl export | predict | eval`: take a trained model out of llavactl, ask it, and score it.

Each command takes a model as a run folder (its latest checkpoint), a checkpoint folder, or (predict
and eval) a folder written by `llavactl export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llavactl.cli._common import OverridesArg, ProfileOpt, console, load
from llavactl.cli._output import json_option, write_json
from llavactl.errors import DataError

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
JsonOpt = Annotated[bool, json_option("Print one JSON object instead of text, for scripts.")]


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
    from llavactl.model.export import TOLERANCE
    from llavactl.train.runs import export_run

    if dtype not in ("fp32", "bf16", "fp16"):
        raise typer.BadParameter(f"--dtype must be fp32, bf16 or fp16, not {dtype!r}")
    result = export_run(model, out_dir, merge_lora=merge_lora, dtype=dtype)  # type: ignore[arg-type]  # checked
    if json_output:
        write_json(result.as_json())
        return
    console.print(f"Exported {result.source} to {out_dir} ({dtype}).", soft_wrap=True)
    if result.merge_logit_difference is not None:
        console.print(
            f"LoRA merged: logits differ from the unmerged model by at most {result.merge_logit_difference:.2e}."
        )
    if result.adapter is not None:
        console.print(f"LoRA adapter (peft) in {result.adapter}; the base model beside it.", soft_wrap=True)
    console.print(
        f"Reloaded with transformers: logits within {result.max_logit_difference:.2e} of llavactl's model "
        f"on {result.checked_records} records (tolerance {TOLERANCE:g}, fp32).",
        soft_wrap=True,
    )
    if result.image_logit_difference is not None:
        console.print(
            f"Uses the image: blank images move its logits by up to {result.image_logit_difference:.3g}.",
            soft_wrap=True,
        )
    else:
        console.print("The image path was not checked: none of the records checked has an image.", soft_wrap=True)


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

    from llavactl.data.images import ImageFileError, ImageLimits, probe
    from llavactl.train.runs import load_predictor

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            "--prompt is not valid UTF-8 text (the shell passed bytes that decode to no characters).",
            fix="pass the question as UTF-8 text",
        ) from None
    predictor = load_predictor(model)
    try:  # the header, against the image limits the model was trained with
        probe(image, ImageLimits.of(predictor.data))
    except ImageFileError as exc:
        raise DataError(f"--image: {exc.message}", fix="pass a readable image file (PNG, JPEG, ...)") from exc
    streamer = None if json_output else TextStreamer(predictor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    prediction = predictor.predict(
        image, prompt, max_new_tokens=max_new_tokens, temperature=temperature, streamer=streamer
    )
    if json_output:
        fields = {"model": str(model), "image": str(image), "prompt": prompt, "answer": prediction.text}
        fields.update(new_tokens=prediction.new_tokens, prompt_tokens=prediction.prompt_tokens)
        write_json(fields)


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
    from llavactl.train.runs import load_predictor

    loaded = load(profile, overrides)
    predictor = load_predictor(model, loaded.profile.data)
    report = run_evaluation(
        predictor,
        loaded.profile.data,
        seed=loaded.profile.seed,
        batch_size=loaded.profile.training.per_device_train_batch_size,
    )
    if json_output:
        write_json(report.as_json())
        return
    console.print(
        f"{report.records} held-out records ({report.supervised_tokens} supervised tokens, {report.skipped} skipped): "
        f"loss {report.loss:.4f}, perplexity {report.perplexity:.3f}",
        soft_wrap=True,
    )
    for name, score in (("colour", report.colour), ("shape", report.shape)):
        if score is not None and score.share is not None:
            console.print(f"Right {name} named in {score.correct}/{score.asked} answers ({score.share:.1%})")
