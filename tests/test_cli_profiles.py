"""The root CLI and `llavactl profiles`: help, version, list, show, provenance, error exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llavactl import __version__
from llavactl.cli.main import app

runner = CliRunner()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("LLAVACTL_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "llavactl", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_version_flag_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"llavactl {__version__}"


def test_help_lists_profiles_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "profiles" in result.output


def test_profiles_list_shows_every_bundled_profile_with_stage_and_device():
    result = runner.invoke(app, ["profiles", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    cells = [[c.strip() for c in line.split("│")] for line in result.output.splitlines()[2:]]
    rows = {c[0]: c[1:3] for c in cells if len(c) > 3}
    assert rows["tiny"] == ["full", "cpu"]
    assert rows["local_lite"] == ["lora", "cpu"]
    assert rows["t4_qlora"] == ["qlora", "cuda"]
    assert rows["pretrain"] == ["projector", "cuda"]
    assert rows["finetune"] == ["full", "cuda"]
    assert rows["finetune_lora"] == ["lora", "cuda"]


def test_profiles_show_json_is_the_resolved_profile():
    result = runner.invoke(app, ["profiles", "show", "t4_qlora", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["stage"] == "qlora"
    assert data["model"]["lora_r"] == 64
    # Inherited from local_lite through `extends`.
    assert data["model"]["vision_tower"] == "jeromeku/clip-vit-large-patch14-336_safe"


def test_profiles_show_provenance_json_names_file_line_override_and_default():
    result = runner.invoke(
        app, ["profiles", "show", "t4_qlora", "training.max_steps=5", "--provenance", "--json"]
    )
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert rows["training.max_steps"] == {"value": 5, "from": "override `training.max_steps=5`"}
    assert rows["model.lora_r"]["from"].endswith("t4_qlora.yaml:11")
    assert rows["model.model_name_or_path"]["from"].endswith("local_lite.yaml:5")
    assert rows["training.weight_decay"] == {"value": 0.0, "from": "schema default"}


def test_profiles_show_yaml_starts_with_the_extends_chain():
    result = runner.invoke(app, ["profiles", "show", "t4_qlora", "seed=3"])
    assert result.exit_code == 0
    assert result.output.splitlines()[0] == "# t4_qlora.yaml extends local_lite.yaml, with seed=3"
    assert "seed: 3" in result.output


def test_config_error_exits_2_with_one_message_and_no_traceback():
    result = _run("profiles", "show", "local_lite", "training.batch_size=4")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "did you mean `training.per_device_train_batch_size`?" in result.stderr
    assert result.stdout == ""


def test_debug_env_shows_the_traceback():
    env = {**os.environ, "LLAVACTL_DEBUG": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "llavactl", "profiles", "show", "nope"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_usage_error_exits_2():
    assert _run("profiles", "show").returncode == 2


@pytest.mark.parametrize("argv", [["--help"], ["profiles", "list"], ["profiles", "show", "local_lite"]])
def test_light_commands_never_import_torch_transformers_or_peft(argv):
    code = (
        "import sys\n"
        "from llavactl.cli.main import app\n"
        f"try:\n    app({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'PIL', 'numpy') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY=\n" in result.stdout, result.stdout + result.stderr
