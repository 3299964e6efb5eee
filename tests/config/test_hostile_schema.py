"""Schema values that parse but mean nothing: non-finite numbers, booleans as numbers, 0 steps,
empty paths. Each is a problem of the profile, with its key, where it was set and a fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from llavactl.config.loader import load_profile
from llavactl.config.schema import DataConfig, TrainingConfig
from llavactl.errors import ConfigError


def problems(*overrides: str, profile: str = "tiny") -> str:
    with pytest.raises(ConfigError) as caught:
        load_profile(profile, overrides)
    return caught.value.message


@pytest.mark.parametrize(
    "key",
    [
        "training.learning_rate",
        "training.mm_projector_lr",
        "training.weight_decay",
        "training.max_grad_norm",
        "training.warmup_ratio",
        "model.lora_dropout",
        "data.max_image_aspect_ratio",
    ],
)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_refuses_non_finite_values(key: str, value: str) -> None:
    message = problems(f"{key}={value}")
    assert f"{key} (override `{key}={value}`): Input should be a finite number" in message
    assert "Fix: use a finite number (not .inf or .nan)" in message


@pytest.mark.parametrize("key", ["training.max_steps", "training.num_train_epochs", "seed", "training.learning_rate"])
def test_a_boolean_is_not_a_number(key: str) -> None:
    message = problems(f"{key}=true")
    assert f"{key} (override `{key}=true`): Input should be a number, not a boolean (got True)" in message
    assert "Fix: use a number (true and false are not numbers)" in message


def test_booleans_stay_booleans_and_numbers_in_strings_still_parse() -> None:
    loaded = load_profile("tiny", ["training.gradient_checkpointing=true", "training.learning_rate=2e-4"])
    assert loaded.profile.training.gradient_checkpointing is True
    assert loaded.profile.training.learning_rate == 2e-4


def test_max_steps_is_minus_one_or_positive() -> None:
    message = problems("training.max_steps=0")
    assert "training.max_steps (override `training.max_steps=0`): 0 steps would train nothing" in message
    assert "or -1 to run `training.num_train_epochs` epochs" in message
    assert load_profile("tiny", ["training.max_steps=-1"]).profile.training.max_steps == -1
    assert load_profile("tiny", ["training.max_steps=1"]).profile.training.max_steps == 1
    assert "greater than or equal to -1" in problems("training.max_steps=-2")


@pytest.mark.parametrize(
    ("key", "fix"),
    [
        ("training.output_dir", "give `training.output_dir` a path, or `training.output_dir=null` for its default"),
        ("data.data_path", "give `data.data_path` a path\n"),
        ("data.image_folder", "or `data.image_folder=null` for its default"),
        ("data.eval_data_path", "a path"),
        ("model.model_name_or_path", "a path"),
        ("model.vision_tower", "a path"),
        ("model.tokenizer_name_or_path", "a path"),
        ("model.pretrain_mm_mlp_adapter", "a path"),
    ],
)
def test_empty_paths_are_refused(key: str, fix: str) -> None:
    message = problems(f"{key}=''") + "\n"
    assert f"{key} (override `{key}=''`): Input should be a path or name, not an empty string" in message
    assert fix in message


def test_a_file_value_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("extends: tiny\ntraining:\n  output_dir: ''\n  learning_rate: .inf\n", encoding="utf-8")
    message = problems(profile=str(path))
    assert f"training.output_dir ({path}:3)" in message and f"training.learning_rate ({path}:4)" in message


def test_the_rules_hold_when_sections_are_built_directly() -> None:
    with pytest.raises(ValueError, match="finite number"):
        TrainingConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="not a boolean"):
        DataConfig(data_path="d.json", max_seq_len=True)
    with pytest.raises(ValueError, match="empty string"):
        DataConfig(data_path=" ")


@pytest.mark.parametrize(
    "override", ['description="a\\ud800"', 'training.output_dir="\\udc00"', 'model.lora_target_modules=["\\ud800"]']
)
def test_a_lone_surrogate_is_not_text(override: str) -> None:
    message = problems(override)
    assert "Input holds a lone surrogate (half of a UTF-16 pair)" in message
    assert "Fix: remove the `\\ud800`-`\\udfff` escape" in message
