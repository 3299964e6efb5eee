"""Profiles load from YAML with extends and overrides, keep provenance, and report every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from llavactl.config.loader import load_profile, suggest_key
from llavactl.errors import ConfigError

BASE = """\
description: base
model:
  model_name_or_path: builtin:tiny-llama
  vision_tower: builtin:tiny-clip
  lora_target_modules: [q_proj, v_proj]
data:
  data_path: builtin:shapes
training:
  learning_rate: 1.0e-3
  per_device_train_batch_size: 2
"""


def _error(name_or_path: str | Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_profile(str(name_or_path), overrides or [])
    return str(info.value)


def test_minimal_profile_fills_schema_defaults(write_yaml):
    loaded = load_profile(str(write_yaml("base.yaml", BASE)))
    assert loaded.profile.training.learning_rate == 1e-3
    assert loaded.profile.training.gradient_accumulation_steps == 1
    assert loaded.profile.stage == "lora"
    assert str(loaded.origin("training.learning_rate")).endswith("base.yaml:9")
    assert str(loaded.origin("training.max_steps")) == "schema default"


def test_extends_merges_mappings_and_replaces_lists(write_yaml):
    write_yaml("base.yaml", BASE)
    child = write_yaml(
        "child.yaml",
        "extends: base.yaml\nmodel:\n  lora_target_modules: [o_proj]\ntraining:\n  learning_rate: 5.0e-4\n",
    )
    loaded = load_profile(str(child))
    assert loaded.profile.model.lora_target_modules == ["o_proj"]
    assert loaded.profile.model.vision_tower == "builtin:tiny-clip"
    assert loaded.profile.training.learning_rate == 5e-4
    assert loaded.profile.training.per_device_train_batch_size == 2
    assert str(loaded.origin("training.learning_rate")).endswith("child.yaml:5")
    assert str(loaded.origin("training.per_device_train_batch_size")).endswith("base.yaml:10")
    assert [p.name for p in loaded.chain] == ["base.yaml", "child.yaml"]


def test_extends_by_name_finds_sibling_file_first(write_yaml):
    write_yaml("mybase.yaml", BASE)
    child = write_yaml("child.yaml", "extends: mybase\nseed: 7\n")
    assert load_profile(str(child)).profile.seed == 7


def test_extends_cycle_is_an_error_naming_the_chain(write_yaml):
    a = write_yaml("a.yaml", "extends: b.yaml\n")
    write_yaml("b.yaml", "extends: a.yaml\n")
    message = _error(a)
    assert "cycle" in message
    assert "a.yaml -> " in message and "b.yaml -> " in message


def test_override_parses_yaml_scalars_and_flow_lists(write_yaml):
    path = write_yaml("base.yaml", BASE)
    loaded = load_profile(
        str(path),
        [
            "training.max_steps=10",
            "training.bf16=false",
            "model.lora_target_modules=[q_proj,k_proj]",
            "training.learning_rate=3e-4",
            "data.image_folder=imgs",
        ],
    )
    assert loaded.profile.training.max_steps == 10
    assert loaded.profile.training.learning_rate == 3e-4
    assert loaded.profile.model.lora_target_modules == ["q_proj", "k_proj"]
    assert loaded.profile.data.image_folder == "imgs"
    assert str(loaded.origin("training.max_steps")) == "override `training.max_steps=10`"


def test_override_null_restores_the_schema_default(write_yaml):
    path = write_yaml("base.yaml", BASE)
    loaded = load_profile(str(path), ["training.learning_rate=null", "model.lora_target_modules=null"])
    assert loaded.profile.training.learning_rate == 2e-5
    assert loaded.profile.model.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert str(loaded.origin("training.learning_rate")) == "override `training.learning_rate=null`"


def test_cpu_guide_command_overrides_work_on_local_lite():
    loaded = load_profile("local_lite", ["model.use_qlora=false", "model.load_in_4bit=false", "training.bf16=false"])
    assert loaded.profile.model.use_qlora is False
    assert loaded.profile.training.bf16 is False


def test_all_problems_are_reported_together_with_origin_and_fix(write_yaml):
    path = write_yaml("base.yaml", BASE + "  bf16: maybe\n")
    message = _error(path, ["training.batch_size=4", "training.learning_rate=fast"])
    assert "3 problems" in message
    assert "training.bf16 (" in message and "base.yaml:11" in message and "use true or false" in message
    assert "training.batch_size (override `training.batch_size=4`): unknown key" in message
    assert "did you mean `training.per_device_train_batch_size`?" in message
    assert "training.learning_rate (override `training.learning_rate=fast`)" in message


def test_unknown_key_in_file_names_file_and_line(write_yaml):
    path = write_yaml("base.yaml", BASE + "  lr_schedule: cosine\n")
    message = _error(path)
    assert "training.lr_schedule (" in message and "base.yaml:11" in message
    assert "did you mean `training.lr_scheduler_type`?" in message


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("training.batch_size", "training.per_device_train_batch_size"),
        ("model.learning_rate", "training.learning_rate"),
        ("training.lerning_rate", "training.learning_rate"),
        ("data.image_folders", "data.image_folder"),
        ("training.epochs", "training.num_train_epochs"),
        ("model.vison_tower", "model.vision_tower"),
    ],
)
def test_did_you_mean(typo, meant):
    assert suggest_key(typo) == meant


def test_wrong_type_names_the_bound(write_yaml):
    path = write_yaml("base.yaml", BASE)
    message = _error(path, ["training.per_device_train_batch_size=0"])
    assert "training.per_device_train_batch_size" in message and "use a value >= 1" in message


def test_broken_yaml_names_file_line_and_column(write_yaml):
    path = write_yaml("broken.yaml", "model:\n  model_name_or_path: x\n   vision_tower: y\n")
    message = _error(path)
    assert "broken.yaml:3:" in message and "not valid YAML" in message


def test_duplicate_key_is_an_error_not_a_silent_overwrite(write_yaml):
    path = write_yaml("dup.yaml", BASE + "  learning_rate: 2.0e-3\n")
    message = _error(path)
    assert "dup.yaml:11" in message and "training.learning_rate` is set twice" in message


def test_profile_that_is_not_a_mapping_is_an_error(write_yaml):
    assert "must be a mapping" in _error(write_yaml("list.yaml", "- a\n- b\n"))


def test_missing_required_key_is_named(write_yaml):
    path = write_yaml("nomodel.yaml", "data:\n  data_path: x.json\nmodel:\n  vision_tower: v\n")
    assert "model.model_name_or_path: required key is not set" in _error(path)


@pytest.mark.parametrize(
    "word",
    ["training.max_steps", "=3", "training..x=1", "training.max_steps="],
)
def test_malformed_override_is_an_error(write_yaml, word):
    path = write_yaml("base.yaml", BASE)
    message = _error(path, [word])
    assert "override" in message or "no value" in message


def test_override_into_a_scalar_is_an_error(write_yaml):
    path = write_yaml("base.yaml", BASE)
    assert "`seed` is a value, not a section" in _error(path, ["seed.x=1"])


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["training.bf16=true", "training.fp16=true"], "bf16 and fp16 are both on"),
        (
            ["stage=qlora", "model.use_qlora=true", "model.load_in_4bit=true", "model.load_in_8bit=true"],
            "4-bit and 8-bit loading are both requested",
        ),
        (["stage=qlora", "model.use_qlora=true"], "QLoRA is requested but the LLM is not loaded quantized"),
        (["model.load_in_4bit=true"], "without QLoRA"),
        (["stage=qlora"], "stage is `qlora` but `model.use_qlora` is false"),
        (["stage=full"], "stage `full` trains no LoRA adapters"),
        (["training.warmup_ratio=0.1", "training.warmup_steps=10"], "Both warmup_ratio and warmup_steps"),
    ],
)
def test_cross_field_rules(write_yaml, overrides, needle):
    path = write_yaml("base.yaml", BASE)
    assert needle in _error(path, overrides)


def test_cross_field_error_names_where_each_value_was_set(write_yaml):
    path = write_yaml("base.yaml", BASE)
    message = _error(path, ["stage=full"])
    assert "stage (override `stage=full`)" in message
    assert "model.lora_target_modules (" in message and "base.yaml:5" in message


def test_lora_keys_cleared_make_full_stage_valid(write_yaml):
    path = write_yaml("base.yaml", BASE)
    loaded = load_profile(str(path), ["stage=full", "model.lora_target_modules=null"])
    assert loaded.profile.stage == "full"


def test_report_to_accepts_llava_scalar_forms(write_yaml):
    path = write_yaml("base.yaml", BASE)
    assert load_profile(str(path), ["training.report_to=none"]).profile.training.report_to == []
    assert load_profile(str(path), ["training.report_to=wandb"]).profile.training.report_to == ["wandb"]


def test_unknown_profile_name_suggests_the_closest(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    message = _error("tiy")
    assert "did you mean `tiny`?" in message


def test_local_profiles_folder_wins_over_bundled(monkeypatch, tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tiny.yaml").write_text(BASE.replace("description: base", "description: mine"))
    monkeypatch.chdir(tmp_path)
    assert load_profile("tiny").profile.description == "mine"


def test_a_bad_list_item_is_named_with_where_the_list_was_set(write_yaml):
    path = write_yaml("p.yaml", "extends: tiny\ntraining:\n  report_to: [tensorboard, bogus]\n")
    with pytest.raises(ConfigError) as from_file:
        load_profile(str(path))
    assert "training.report_to[1] (p.yaml:3)" in from_file.value.message.replace(str(path), "p.yaml")
    with pytest.raises(ConfigError) as from_override:
        load_profile("tiny", ["training.report_to=[bogus]"])
    assert "training.report_to[0] (override `training.report_to=[bogus]`)" in from_override.value.message


def test_a_profile_path_that_is_a_folder_or_a_device_is_not_called_missing(tmp_path):
    for path in (tmp_path, Path("/dev/null")):
        with pytest.raises(ConfigError, match="is not a file"):
            load_profile(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(str(tmp_path / "none.yaml"))
