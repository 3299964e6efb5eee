"""The model card (``README.md``) that ``llavactl export`` writes beside the weights.

It follows the Hub's model-card layout, as transformers' ``Trainer`` writes it for the models it
pushes: YAML metadata first (``base_model`` naming the LLM and the vision tower, ``library_name``,
``pipeline_tag``, tags, the data sets where they are Hub names), then the training
hyperparameters, the run's final figures and its loss chart — ``loss.png`` beside the card when
matplotlib is installed (the ``plots`` extra), else the same chart as text inside the card.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from llavactl.errors import ConfigError
from llavactl.train.charts import Series as ChartSeries
from llavactl.train.charts import chart, smoothed, write_png
from llavactl.train.checkpoint import checkpoint_step
from llavactl.train.metrics import RUN_FILE
from llavactl.train.run_state import read_metrics

if TYPE_CHECKING:
    from llavactl.config.schema import Profile

CARD_FILE = "README.md"
CHART_FILE = "loss.png"
# A Hub repository id: ORG/NAME, neither part a path element of its own.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelCard:
    text: str
    chart_png: bytes | None  # loss.png, when matplotlib could draw it

    def files(self) -> dict[str, bytes]:
        files = {CARD_FILE: self.text.encode("utf-8")}
        if self.chart_png is not None:
            files[CHART_FILE] = self.chart_png
        return files


def hub_datasets(profile: Profile) -> list[str]:
    """The profile's data sets that are Hub names (files, folders and builtin data are not)."""
    names = [profile.data.data_path, profile.data.eval_data_path]
    return [n for n in dict.fromkeys(names) if n and _HUB_ID.match(n) and not Path(n).expanduser().exists()]


def model_card(profile: Profile, checkpoint: Path, *, title: str, dtype: str, merged_lora: bool) -> ModelCard:
    """The card of an export of ``checkpoint``, trained with ``profile``; the run's record and
    figures are read from the checkpoint's run folder where they are there."""
    run = checkpoint.parent
    record = _read_record(run / RUN_FILE)
    metrics = read_metrics(run)
    step = checkpoint_step(checkpoint)
    metrics = [m for m in metrics if step is None or m["step"] <= step]
    model, t = profile.model, profile.training
    tags = ["llava", "llavactl", "vision-language", "image-text-to-text", profile.stage]
    if profile.uses_lora and not merged_lora:
        tags.append("peft")
    meta: dict[str, Any] = {
        "base_model": [model.model_name_or_path, model.vision_tower],
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": tags,
    }
    if datasets := hub_datasets(profile):
        meta["datasets"] = datasets
    world = record.get("world") if isinstance(record.get("world"), dict) else {}
    processes = int(world.get("size") or 1)
    hyper = {
        "stage": profile.stage,
        "learning_rate": t.learning_rate,
        "mm_projector_lr": t.mm_projector_lr,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "processes": processes,
        "total_train_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * processes,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_ratio": t.warmup_ratio,
        "warmup_steps": t.warmup_steps,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps,
        "seed": profile.seed,
        "precision": record.get("precision"),
        "gradient_checkpointing": t.gradient_checkpointing,
        "conversation_template": profile.data.conversation_template,
        "max_seq_len": profile.data.max_seq_len,
        "image_size": profile.data.image_size,
    }
    if profile.uses_lora:
        hyper.update(lora_r=model.lora_r, lora_alpha=model.lora_alpha, lora_dropout=model.lora_dropout)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"A LLaVA-style vision-language model: the vision tower `{model.vision_tower}`, a `{model.mm_projector_type}` "
        f"projector and the LLM `{model.model_name_or_path}`, trained with "
        f"llavactl (stage `{profile.stage}`) and exported as a "
        f"transformers LLaVA folder in {dtype}" + (" with the LoRA adapters merged." if merged_lora else "."),
        "",
        f"Trained on `{profile.data.data_path}` with the `{profile.data.conversation_template}` template; "
        f"exported from `{checkpoint.name}`.",
        "",
        "## Training hyperparameters",
        "",
        *(f"- {key}: {value}" for key, value in hyper.items() if value is not None),
        "",
        "## Training results",
        "",
        *_results(record, metrics, step),
        "",
    ]
    png, chart_lines = _loss_chart(metrics)
    if png is not None:
        lines += [f"![loss over the training steps]({CHART_FILE})", ""]
    elif chart_lines:
        lines += ["```text", *chart_lines, "```", ""]
    versions = record.get("versions") if isinstance(record.get("versions"), dict) else {}
    if versions:
        lines += ["## Framework versions", "", *(f"- {k} {v}" for k, v in versions.items()), ""]
    return ModelCard("\n".join(lines), png)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a checkpoint copied out of its run folder: the card says less
    return value if isinstance(value, dict) else {}


def _results(record: dict[str, Any], metrics: list[dict[str, Any]], step: int | None) -> list[str]:
    final = record.get("final_metrics") if isinstance(record.get("final_metrics"), dict) else {}
    figures: list[tuple[str, Any]] = [("steps trained", step)]
    if metrics:
        figures += [("first logged loss", metrics[0].get("loss")), ("last logged loss", metrics[-1].get("loss"))]
    if final.get("step") == step:  # the run's final figures are this checkpoint's
        figures += [
            ("final loss", final.get("final_loss")),
            ("training seconds", final.get("train_seconds")),
            ("MFU", f"{100 * final['mfu']:.1f}%" if isinstance(final.get("mfu"), int | float) else None),
        ]
    rows = [f"- {name}: {value:.4g}" if isinstance(value, float) else f"- {name}: {value}" for name, value in figures]
    return [row for row, (_, value) in zip(rows, figures, strict=True) if value is not None] or ["- no figures logged"]


def _loss_chart(metrics: list[dict[str, Any]]) -> tuple[bytes | None, list[str]]:
    loss = [(m["step"], float(m["loss"])) for m in metrics if isinstance(m.get("loss"), int | float)]
    if not loss:
        return None, []
    smooth = list(zip([x for x, _ in loss], smoothed([y for _, y in loss]), strict=True))
    drawn = chart("loss", [ChartSeries("raw", loss, "."), ChartSeries("smoothed", smooth, "*")], columns=80)
    buffer = io.BytesIO()
    try:
        write_png([drawn], buffer)
    except ConfigError:  # no matplotlib: the same chart as text
        return None, drawn.render()
    return buffer.getvalue(), drawn.render()
