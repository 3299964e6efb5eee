"""The root CLI and `llavactl profiles`: help, version, list, show, provenance, error exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import run_cli

from llavactl import __version__


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("LLAVACTL_DEBUG", raising=False)


def test_version_flag_prints_the_package_version():
    code, out, _ = run_cli(["--version"])
    assert code == 0
    assert out.strip() == f"llavactl {__version__}"


def test_help_lists_profiles_command():
    code, out, _ = run_cli(["--help"])
    assert code == 0
    assert "profiles" in out


def test_profiles_list_shows_every_bundled_profile_with_stage_and_device():
    code, out, _ = run_cli(["profiles", "list"])
    assert code == 0
    cells = [[c.strip() for c in line.split("│")] for line in out.splitlines()[2:]]
    rows = {c[0]: c[1:3] for c in cells if len(c) > 3}
    assert rows["tiny"] == ["full", "cpu"]
    assert rows["local_lite"] == ["lora", "cpu"]
    assert rows["t4_qlora"] == ["qlora", "cuda"]
    assert rows["pretrain"] == ["projector", "cuda"]
    assert rows["finetune"] == ["full", "cuda"]
    assert rows["finetune_lora"] == ["lora", "cuda"]


def test_profiles_show_json_is_the_resolved_profile():
    code, out, _ = run_cli(["profiles", "show", "t4_qlora", "--json"])
    assert code == 0
    data = json.loads(out)
    assert data["stage"] == "qlora"
    assert data["model"]["lora_r"] == 64
    # Inherited from local_lite through `extends`.
    assert data["model"]["vision_tower"] == "jeromeku/clip-vit-large-patch14-336_safe"


def test_profiles_show_provenance_json_names_file_line_override_and_default():
    code, out, _ = run_cli(["profiles", "show", "t4_qlora", "training.max_steps=5", "--provenance", "--json"])
    assert code == 0
    rows = json.loads(out)
    assert rows["training.max_steps"] == {"value": 5, "from": "override `training.max_steps=5`"}
    assert rows["model.lora_r"]["from"].endswith("t4_qlora.yaml:11")
    assert rows["model.model_name_or_path"]["from"].endswith("local_lite.yaml:5")
    assert rows["training.weight_decay"] == {"value": 0.0, "from": "schema default"}


def test_profiles_show_yaml_starts_with_the_extends_chain():
    code, out, _ = run_cli(["profiles", "show", "t4_qlora", "seed=3"])
    assert code == 0
    assert out.splitlines()[0] == "# t4_qlora.yaml extends local_lite.yaml, with seed=3"
    assert "seed: 3" in out


def test_config_error_exits_2_with_one_message_and_no_traceback():
    code, out, err = run_cli(["profiles", "show", "local_lite", "training.batch_size=4"])
    assert code == 2
    assert "Traceback" not in err
    assert "did you mean `training.per_device_train_batch_size`?" in err
    assert out == ""


def test_debug_env_shows_the_traceback():
    env = {**os.environ, "LLAVACTL_DEBUG": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "llavactl", "profiles", "show", "nope"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_usage_error_exits_2():
    assert run_cli(["profiles", "show"])[0] == 2


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
