"""What several test modules share: tokenizers, record builders, fake machines, profiles, the CLI
runner, the recipe runner and the tiny model. Fixtures (shapes data) are in ``conftest.py``; test
modules never import each other, only this module."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from llavactl.resolve import GpuFacts, MachineFacts, WorldFacts

if TYPE_CHECKING:
    from llavactl.config.loader import LoadedProfile
    from llavactl.config.schema import ModelConfig
    from llavactl.model.assembly import AssembledModel
    from llavactl.train.recipe import TrainResult

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "llava_reference"
SPM_MODEL = Path(__import__("mistral_common").__file__).parent / "data" / "tokenizer.model.v1"


@functools.cache
def llama_tokenizer() -> Any:
    """The real 32k Llama SentencePiece tokenizer (from mistral-common) with `<image>` and a pad token."""
    from transformers import LlamaTokenizer

    folder = tempfile.mkdtemp(prefix="llavactl-spm-")
    shutil.copy(SPM_MODEL, Path(folder) / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.pad_token = tok.unk_token
    return tok


@functools.cache
def byte_tokenizer() -> Any:
    """The builtin byte-level tokenizer of the `tiny` profile."""
    from llavactl.model.sources import load_tokenizer

    return load_tokenizer("builtin:tiny-llama")


@functools.cache
def spm_folder() -> Path:
    """A tokenizer folder holding only the real 32k Llama SentencePiece model (a Llama-2 tokenizer)."""
    folder = Path(tempfile.mkdtemp(prefix="llavactl-spm-folder-"))
    shutil.copy(SPM_MODEL, folder / "tokenizer.model")
    return folder


def byte_tokenizer_folder(folder: Path, *specials: str, chat_template: str | None = None) -> Path:
    """The builtin byte-level tokenizer with ``specials`` added as special tokens (and a chat
    template of its own when given), saved in ``folder``: what a model folder's tokenizer is."""
    from transformers import AddedToken

    from llavactl.model.builtin import tokenizer

    tok = tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return folder


def image_id(tok: Any) -> int:
    return tok.convert_tokens_to_ids("<image>")


def record(*turns: tuple[str, str], image: Any = None, rid: Any = "r", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        out["image"] = image
    out.update(extra)
    return out


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------ machines the tests make up

GIB = 1024**3
PACKAGES: dict[str, str | None] = {
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "peft": "0.21.2",
    "safetensors": "0.8.0",
    "pillow": "13.0.0",
    "bitsandbytes": None,
    "wandb": None,
}
CPU = MachineFacts(
    python=(3, 11, 7),
    packages=PACKAGES,
    torch_cuda_build=None,
    cpu_cores=2,
    torch_threads=2,
    cpu_capability="AVX2",
    cpu_flags=frozenset({"avx2"}),
    ram_total_bytes=24 * GIB,
    ram_available_bytes=20 * GIB,
)
CPU_BF16 = replace(CPU, cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}))
MPS = replace(CPU, mps=True)
T4 = replace(
    CPU,
    torch_cuda_build="12.4",
    gpus=[GpuFacts("Tesla T4", 16 * GIB, 15 * GIB, (7, 5))],
    packages={**PACKAGES, "bitsandbytes": "0.45.0"},
)
A100 = replace(T4, gpus=[GpuFacts("NVIDIA A100-SXM4-80GB", 80 * GIB, 79 * GIB, (8, 0))])
H100 = GpuFacts("NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, (9, 0))
EIGHT_GPUS = replace(CPU, torch_cuda_build="12.8", gpus=[H100] * 8)
ONE = WorldFacts(1, 1, frozenset({"gloo", "nccl"}))


# ------------------------------------------------------------------ profiles, the CLI, the recipe


def profile(name: str, *overrides: str) -> LoadedProfile:
    """A bundled profile with ``key=value`` overrides, validated."""
    from llavactl.config.loader import load_profile

    return load_profile(name, list(overrides))


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str, str]:
    """``llavactl ARGS`` in this process, errors mapped as the real command maps them: (exit code,
    stdout, stderr). Output is read from ``capsys``, or captured here where a test has none."""
    import contextlib
    import io

    from llavactl.cli._errors import run_guarded
    from llavactl.cli.main import app

    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if capsys is None:
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(err))
        with pytest.raises(SystemExit) as info:
            run_guarded(lambda: app(args, prog_name="llavactl"))
    if capsys is not None:
        captured = capsys.readouterr()
        return int(info.value.code or 0), captured.out, captured.err
    return int(info.value.code or 0), out.getvalue(), err.getvalue()


def train_recipe(
    overrides: list[str],
    *,
    resume: str | None = None,
    force: bool = False,
    name: str = "tiny",
    random_weights: bool = False,
) -> tuple[TrainResult, str]:
    """Train profile ``name`` with ``overrides`` through the recipe; the result and what it printed."""
    import io

    from rich.console import Console

    from llavactl.train.progress import TrainingProgress
    from llavactl.train.recipe import TrainRecipe

    out = io.StringIO()
    with TrainingProgress(Console(file=out, width=300)) as progress:
        recipe = TrainRecipe(
            profile(name, *overrides), progress, resume=resume, force=force, random_weights=random_weights
        )
        result = recipe.run()
    return result, out.getvalue()


def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int, signum: int) -> None:
    """Send this process ``signum`` once the recipe has logged optimizer step ``step``."""
    import os

    from llavactl.train.metrics import MetricsWriter

    log = MetricsWriter.log

    def log_then_signal(self: MetricsWriter, at: int, values: dict[str, float]) -> None:
        log(self, at, values)
        if at == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(MetricsWriter, "log", log_then_signal)


# ------------------------------------------------------------------ the tiny model


def tiny_config(**fields: object) -> ModelConfig:
    """The `tiny` profile's model section: the builtin 3-layer Llama and 2-layer CLIP."""
    from llavactl.config.schema import ModelConfig

    return ModelConfig(model_name_or_path="builtin:tiny-llama", vision_tower="builtin:tiny-clip", **fields)


def collated(assembled: AssembledModel, replies: tuple[str, ...] = ("a red square", "two dots")) -> dict:
    """A batch as the data collator makes it: `<image>` expanded, right-padded, prompt masked."""
    import torch

    tok = assembled.tokenizer
    image = [assembled.image_token_id] * assembled.image_spec.num_tokens
    rows = []
    for reply in replies:
        prompt = [tok.bos_token_id, *image, *tok("USER: what is it? ASSISTANT:", add_special_tokens=False).input_ids]
        rows.append((prompt, [*tok(" " + reply, add_special_tokens=False).input_ids, tok.eos_token_id]))
    length = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), length), tok.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        input_ids[i, :n] = torch.tensor(prompt + reply)
        labels[i, len(prompt) : n] = torch.tensor(reply)
        attention_mask[i, :n] = 1
    size = assembled.image_spec.size
    pixels = torch.randn(len(rows), 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixels}


def tiny_model(shapes: Path, *overrides: str) -> tuple[AssembledModel, object]:
    """The tiny profile's model on ``shapes``, its trainable weights moved off their init (so that
    LoRA adapters change the logits), and the profile."""
    import torch

    from llavactl.model.assembly import build_llava

    loaded = profile("tiny", f"data.data_path={shapes}", f"data.eval_data_path={shapes}", *overrides)
    prof = loaded.profile
    assembled = build_llava(prof.model, prof.stage, image_size=prof.data.image_size, seed=prof.seed)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in assembled.model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return assembled, prof


def make_run(run_dir: Path, shapes: Path, *overrides: str) -> AssembledModel:
    """A run folder with one checkpoint of the tiny model, as the trainer writes it."""
    from llavactl.model.weights import save_trainable
    from llavactl.train.checkpoint import save_checkpoint

    assembled, prof = tiny_model(shapes, *overrides)
    save_checkpoint(
        run_dir,
        3,
        write_weights=lambda folder: save_trainable(assembled, folder),
        training_state={},
        progress={"step": 3, "profile": prof.model_dump(mode="json")},
        save_total_limit=None,
    )
    assembled.model.eval()
    return assembled


# ------------------------------------------------------------------ several processes on 16 shapes records

# The steps of a run on tests/train's `shapes16` fixture: one epoch of 4 records a step.
SHAPES16_STEPS = 4
WEIGHT_FILES = ("trainable.safetensors", "projector.safetensors")


def shapes16_overrides(shapes16: Path, output_dir: Path, *extra: str) -> list[str]:
    """`tiny` on the 16 records: micro-batches of 2, a checkpoint every 2 steps, every step logged."""
    return [
        f"data.data_path={shapes16}",
        f"training.output_dir={output_dir}",
        "training.per_device_train_batch_size=2",
        "training.learning_rate=1e-2",
        f"training.max_steps={SHAPES16_STEPS}",
        "training.warmup_ratio=0",
        "training.warmup_steps=1",
        "training.logging_steps=1",
        "training.save_steps=2",
        *extra,
    ]


def worker_env(*hooks: Path, **extra: str) -> dict[str, str]:
    """The environment of a launcher this test starts: none of a torchrun around pytest, one thread a
    process (they share the machine's cores), the folders ``hooks`` (a ``sitecustomize.py`` each)
    first on the path."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    if hooks:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, hooks), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **extra}


def train_on_two_processes(overrides: list[str], *args: str) -> str:
    """`llavactl train --profile tiny OVERRIDES ARGS --nproc-per-node 2`, which must succeed; its stdout."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "llavactl", "train", "--profile", "tiny", *overrides, *args]
    done = subprocess.run(
        [*command, "--nproc-per-node", "2"], env=worker_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def weights_of(folder: Path) -> dict[str, Any]:
    """The trained weights of a checkpoint: its safetensors files, or its shards read whole."""
    from safetensors.torch import load_file

    from llavactl.model import weights
    from llavactl.train.runs import load_checkpoint

    if not weights.is_sharded(folder):
        return {k: v for f in WEIGHT_FILES for k, v in load_file(folder / f).items()}
    assembled, _, _ = load_checkpoint(folder)
    return {name: p.detach() for name, p in assembled.model.named_parameters() if name in _trained_names(folder)}


def _trained_names(folder: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {key[len("weights.") :] for key in keys if key.startswith("weights.")}


def logged_losses(output_dir: Path) -> list[float]:
    """The loss of every line of the run's ``metrics.jsonl``."""
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(one: Path, two: Path, steps: tuple[int, ...] = tuple(range(1, SHAPES16_STEPS + 1))) -> None:
    """Run ``two`` (several processes) trained what run ``one`` (one process, accumulation) did: the
    weights within float noise, and the losses of ``steps`` within 1e-6."""
    import torch

    single = weights_of(one / f"checkpoint-{SHAPES16_STEPS}")
    double = weights_of(two / f"checkpoint-{SHAPES16_STEPS}")
    assert single.keys() == double.keys()
    # Two processes sum gradients in another order than one process accumulating: float noise of
    # ~1e-7. AdamW divides each gradient by its own running size, so where a gradient is near zero
    # (a tower's k_proj bias has none in exact arithmetic) the noise grows to up to 8e-4 after 4
    # steps at lr 1e-2; leaving one record of the 16 out changes weights by 0.03.
    assert max((single[k] - double[k]).abs().max().item() for k in single) < 1e-3
    # ... and the weights did move: the comparison is not between two untrained models.
    assert any(not torch.equal(single[k], weights_of(one / "checkpoint-2")[k]) for k in single)
    assert logged_losses(two) == pytest.approx([logged_losses(one)[k - 1] for k in steps], rel=1e-6)
