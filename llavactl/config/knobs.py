"""The profile overrides that lower a training step's memory: one list, cheapest in quality first.

dry-run's suggestions (:func:`llavactl.plan.build.suggest`) try them one after the other on the
traced estimate; the out-of-memory error of ``llavactl train`` names them as the fix. It lives
with the profile because both read it, and the recipe does not import the planner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llavactl.config.schema import Profile


@dataclass(frozen=True)
class Knob:
    """Overrides that lower memory together, and what they cost."""

    overrides: dict[str, Any]
    why: str

    @property
    def text(self) -> str:
        return as_words(self.overrides)


def as_words(overrides: dict[str, Any]) -> str:
    """Overrides as ready-to-paste ``key=value`` words."""
    return " ".join(f"{key}={str(v).lower() if isinstance(v, bool) else v}" for key, v in overrides.items())


def memory_knobs(
    profile: Profile,
    *,
    p95_tokens: int | None = None,
    native_image_size: int | None = None,
    images_per_sample: int = 0,
) -> list[Knob]:
    """The overrides that lower ``profile``'s memory, in order of what they cost in quality (none
    first). ``p95_tokens``: the 95th percentile of the records' lengths, where they were measured;
    ``native_image_size`` and ``images_per_sample``: the tower's image side in px and the images of
    a record, without which no image size is proposed."""
    t, data, model = profile.training, profile.data, profile.model
    knobs: list[Knob] = []
    accumulation = t.gradient_accumulation_steps
    if data.max_tokens_per_batch:
        budget = data.max_tokens_per_batch
        while budget > data.max_seq_len:
            budget, accumulation = max(budget // 2, data.max_seq_len), accumulation * 2
            overrides = {"data.max_tokens_per_batch": budget, "training.gradient_accumulation_steps": accumulation}
            knobs.append(Knob(overrides, "smaller micro-batches, about the same global batch: no quality cost"))
    else:
        batch = t.per_device_train_batch_size
        while batch > 1 and batch % 2 == 0:
            batch, accumulation = batch // 2, accumulation * 2
            overrides = {
                "training.per_device_train_batch_size": batch,
                "training.gradient_accumulation_steps": accumulation,
            }
            knobs.append(Knob(overrides, "smaller micro-batches, same global batch: no quality cost"))
    if not t.gradient_checkpointing:
        knobs.append(
            Knob({"training.gradient_checkpointing": True}, "recompute activations: no quality cost, ~30% slower")
        )
    for size in (224, 168):
        if native_image_size is not None and size < native_image_size and images_per_sample:
            knobs.append(Knob({"data.image_size": size}, f"{size} px images: fewer image tokens, less visual detail"))
    if profile.uses_lora and model.lora_r > 8:
        overrides = {"model.lora_r": model.lora_r // 2, "model.lora_alpha": model.lora_alpha // 2}
        knobs.append(Knob(overrides, "half the LoRA rank: fewer adapter parameters"))
    if profile.stage == "full":
        knobs.append(Knob({"stage": "lora"}, "LoRA instead of the full LLM: far less optimizer state"))
    if p95_tokens is None:
        shorter, why = max(data.max_seq_len // 2, 64), "half the tokens a record may have: longer records are cut"
    else:
        shorter, why = max(p95_tokens, 64), "cut records at the 95th percentile of lengths"
    if shorter < data.max_seq_len:
        knobs.append(Knob({"data.max_seq_len": shorter}, why))
    return knobs
