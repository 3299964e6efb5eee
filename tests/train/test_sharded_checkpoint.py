"""`training.distributed: fsdp` checkpoints are sharded with torch.distributed.checkpoint, on one process
as on many: written atomically with the manifest, resumed exactly, read back whole by export, predict and
eval. (Two processes writing their shards, and resuming on another number: test_distributed_training.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli, train_recipe

from llavactl.errors import CheckpointError, ModelSourceError
from llavactl.model import weights
from llavactl.train import checkpoint
from llavactl.train.runs import load_checkpoint

SETTINGS = [
    "training.distributed=fsdp",
    "training.max_steps=4",
    "training.save_steps=2",
    "training.logging_steps=1",
    "training.learning_rate=1e-2",
]


def _run(shapes: Path, out: Path, *, resume: str | None = None) -> list[float]:
    result, _ = train_recipe([f"data.data_path={shapes}", f"training.output_dir={out}", *SETTINGS], resume=resume)
    return result.losses


@pytest.fixture(scope="module")
def sharded_run(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "run"
    _run(shapes, out)
    return out


def _parameters(folder: Path) -> dict[str, torch.Tensor]:
    assembled, _, _ = load_checkpoint(folder)
    return {name: p.detach().clone() for name, p in assembled.model.named_parameters()}


def test_an_fsdp_checkpoint_holds_shards_listed_in_its_manifest(sharded_run: Path) -> None:
    folder = sharded_run / "checkpoint-4"
    names = {p.name for p in folder.iterdir()}
    assert {".metadata", "__0_0.distcp"} <= names
    assert not names & {weights.OTHER_FILE, weights.PROJECTOR_FILE}  # nothing gathered whole
    assert weights.is_sharded(folder)
    manifest = json.loads((folder / checkpoint.MANIFEST_FILE).read_text())["files"]
    assert {".metadata", "__0_0.distcp"} <= set(manifest)
    assert checkpoint.read_progress(folder)["weights_format"] == "sharded"
    assert "optimizer" not in checkpoint.read_training_state(folder)[0]  # it is in the shards
    assert not list(sharded_run.glob(".tmp-*"))


def test_a_sharded_checkpoint_loads_whole_into_one_process(sharded_run: Path) -> None:
    later, earlier = _parameters(sharded_run / "checkpoint-4"), _parameters(sharded_run / "checkpoint-2")
    # The trained weights came back: they differ between steps, in the LLM and in the projector.
    assert any(not torch.equal(later[k], earlier[k]) for k in later if "language_model" in k)
    assert any(not torch.equal(later[k], earlier[k]) for k in later if "projector" in k)


def test_a_sharded_checkpoint_resumes_bit_for_bit(shapes: Path, sharded_run: Path, tmp_path: Path) -> None:
    shutil.copytree(sharded_run / "checkpoint-2", tmp_path / "checkpoint-2")
    losses = _run(shapes, tmp_path, resume="auto")
    whole = [json.loads(line)["loss"] for line in (sharded_run / "metrics.jsonl").read_text().splitlines()]
    assert losses == whole[2:]
    resumed, uninterrupted = _parameters(tmp_path / "checkpoint-4"), _parameters(sharded_run / "checkpoint-4")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_a_damaged_shard_is_named_before_anything_loads(shapes: Path, sharded_run: Path, tmp_path: Path) -> None:
    shutil.copytree(sharded_run / "checkpoint-2", tmp_path / "checkpoint-2")
    shard = tmp_path / "checkpoint-2" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp does not hold the bytes it was saved with"):
        _run(shapes, tmp_path, resume="auto")


def test_a_sharded_checkpoint_of_another_stage_is_named(sharded_run: Path) -> None:
    from llavactl.config.loader import load_profile
    from llavactl.model.assembly import build_llava

    profile = load_profile("tiny", []).profile
    projector_only = build_llava(profile.model, "projector", image_size=profile.data.image_size, seed=0)
    with pytest.raises(ModelSourceError, match=r"does not match the model: missing nothing; unexpected .*language"):
        weights.load_trainable(projector_only, sharded_run / "checkpoint-4")


def test_export_writes_one_safetensors_folder_from_the_shards(
    sharded_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["export", str(sharded_run), str(tmp_path / "out"), "--json"], capsys)
    assert code == 0, out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads(out)["max_logit_difference"] <= 1e-5
