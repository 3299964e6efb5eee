"""`make gpu-check`: every CUDA path of llavactl and a short GPU benchmark, as one command.

On a CUDA machine, in under 8 minutes on one H200 (`--quick`: under a minute):

1. The environment: the GPU, and the versions of torch, transformers, peft, bitsandbytes and the
   other packages llavactl imports. Wheels carried in ``.whl/`` (bitsandbytes, see docs/gpu.md) are
   installed into a temporary folder with pip's ``--no-index`` first; nothing comes from a network.
2. The tests marked ``gpu`` (tests/gpu/test_gpu.py; `--quick` leaves out those also marked ``slow``),
   each one's outcome read from pytest's junit file, or from its verbose lines when the phase ran
   out of time.
3. The benchmark: local_lite's shapes (CLIP ViT-L/14-336 + SmolLM-135M) with random weights, LoRA,
   bf16 autocast, on the same synthetic records: samples/s of llavactl's loop (``TrainRecipe``) and
   of transformers' Trainer, and MFU: the FLOPs of one llavactl step (llavactl's `flop_counter`,
   recomputation under gradient checkpointing included) per sample, times samples/s, over this
   GPU's measured bf16 matmul rate (an 8192 x 8192 matmul). The Trainer's MFU counts the same
   useful work per sample (its loss computes logits for every position, llavactl's only for the
   supervised ones).

Without CUDA it runs a CPU dry mode and says so: the gpu tests must all be collected and skipped,
and the benchmark's plumbing runs on the `tiny` profile's builtin models on the CPU. Nothing in
that mode ran on a GPU.

    python benchmarks/gpu_check.py [--quick] [--wheels DIR]

Each phase runs in its own process with a time limit. The last line of stdout is one JSON object;
with ``$OUT`` set, ``gpu_check.json``, ``gpu_check.log`` and ``junit.xml`` are also written there.
The exit code is 0 when every phase passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Distributions llavactl imports (pyproject's dependencies), the test runner and QLoRA's kernels.
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "safetensors",
    "tokenizers",
    "huggingface-hub",
    "accelerate",
    "pydantic",
    "typer",
    "rich",
    "pyyaml",
    "pillow",
    "numpy",
    "packaging",
    "pytest",
)
# Seconds per phase: tests + benchmark + startup stay under 8 minutes (1 minute with --quick).
LIMITS = {"full": {"tests": 290, "benchmark": 140}, "quick": {"tests": 36, "benchmark": 18}}
# Benchmark profile and sizes: records per step, timed steps, steps left out of the timing. --quick and
# the CPU dry mode time the `tiny` profile's builtin models (building local_lite's alone takes seconds).
SIZES = {"full": ("local_lite", 8, 40, 5), "quick": ("tiny", 8, 20, 3), "cpu": ("tiny", 2, 4, 1)}


class Log:
    """Everything the phases print, in one file under $OUT (or a temporary folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "gpu_check.log"
        self._file = self.path.open("w", encoding="utf-8")

    def write(self, text: str) -> None:
        self._file.write(text if text.endswith("\n") else text + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------- the environment


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def environment() -> dict[str, Any]:
    import torch

    described: dict[str, Any] = {
        "cuda": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "versions": versions(),
    }
    if described["cuda"]:
        properties = torch.cuda.get_device_properties(0)
        described.update(
            gpu=properties.name,
            gpus=torch.cuda.device_count(),
            capability=f"{properties.major}.{properties.minor}",
            memory_gib=round(properties.total_memory / 1024**3, 1),
            bf16=torch.cuda.is_bf16_supported(),
        )
    else:
        described["gpu"] = None
    described["notes"] = _version_notes(described["versions"])
    return described


def _version_notes(found: dict[str, str | None]) -> list[str]:
    """Packages missing, or older than pyproject's lower bounds (llavactl is tested from those on)."""
    from packaging.requirements import Requirement

    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    requirements = [Requirement(line) for line in re.findall(r'^\s*"([^"]+)"', block, re.MULTILINE)]
    notes = []
    for requirement in requirements:
        name = requirement.name.lower()
        have = found.get(name)
        if name not in found:
            continue
        if have is None:
            notes.append(f"{name} is not installed (llavactl needs {requirement})")
        elif not requirement.specifier.contains(have, prereleases=True):
            notes.append(f"{name} {have} is outside llavactl's tested range ({requirement})")
    if found.get("bitsandbytes") is None:
        notes.append("bitsandbytes is not installed: the QLoRA tests skip (docs/gpu.md: carry its wheel)")
    return notes


def install_carried_wheels(wheels: Path, log: Log) -> tuple[str | None, list[str]]:
    """Install ``wheels/*.whl`` into a temporary folder without any index; its path for PYTHONPATH."""
    carried = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not carried:
        return None, []
    target = Path(tempfile.mkdtemp(prefix="llavactl-wheels-"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--target", str(target), *map(str, carried)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    log.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}")
    if done.returncode != 0:
        raise RuntimeError(f"installing the carried wheels failed: {done.stderr.strip()[-500:]}")
    return str(target), [w.name for w in carried]


# ---------------------------------------------------------------- phases in their own processes


def run_phase(command: list[str], *, limit: float, env: dict[str, str], log: Log, name: str) -> dict[str, Any]:
    """Run ``command`` in its own process group, stopped after ``limit`` seconds; its output goes to the log."""
    log.write(f"\n===== {name}: {' '.join(command)} (limit {limit:.0f} s)")
    started = time.perf_counter()
    output_file = log.folder / f"{name}.out"
    with output_file.open("w", encoding="utf-8") as output:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode: int | None = process.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            returncode, timed_out = None, True
    text = output_file.read_text(encoding="utf-8", errors="replace")
    log.write(text)
    seconds = round(time.perf_counter() - started, 1)
    log.write(f"===== {name}: exit {returncode}{' (timed out)' if timed_out else ''} after {seconds} s")
    return {"returncode": returncode, "timed_out": timed_out, "seconds": seconds, "output": text}


def child_env(extra_path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: builtin and random-weight models only
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


_VERBOSE_LINE = re.compile(r"^(tests/gpu/test_gpu\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", re.MULTILINE)


def test_results(junit: Path, output: str, timed_out: bool) -> list[dict[str, Any]]:
    """Each test's outcome: from the junit file, or from pytest's verbose lines when it never wrote one."""
    if junit.is_file():
        return _junit_results(junit)
    results = [{"name": m[1].split("::", 1)[1], "outcome": m[2].lower()} for m in _VERBOSE_LINE.finditer(output)]
    # Verbose mode prints the test's id before it runs: the last one without an outcome was cut off.
    started = re.findall(r"^tests/gpu/test_gpu\.py::(\S+)", output, re.MULTILINE)
    done = {r["name"] for r in results}
    cut = [name for name in started if name not in done]
    if cut:
        results.append({"name": cut[-1], "outcome": "timeout" if timed_out else "crashed"})
    return results


def _junit_results(junit: Path) -> list[dict[str, Any]]:
    results = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", None
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (element.get("message") or "")[:800]
                break
        result: dict[str, Any] = {"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0))}
        if message:
            result["message"] = message
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        if properties:
            result["properties"] = properties
        results.append(result)
    return results


def tests_phase(mode: str, cuda: bool, env: dict[str, str], log: Log) -> dict[str, Any]:
    junit = log.folder / "junit.xml"
    junit.unlink(missing_ok=True)
    # Without CUDA every gpu test is collected (and must skip), --quick or not.
    marker = "gpu and not slow" if mode == "quick" and cuda else "gpu"
    command = [sys.executable, "-m", "pytest", "tests/gpu/test_gpu.py", "-m", marker, "-v", "-rA"]
    command += ["-p", "no:cacheprovider"]
    # xunit1 keeps record_property's values (the resume's exactness, the memory figures) in the file.
    command += [f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    limit = LIMITS[mode]["tests"] if cuda else 120
    if importlib.util.find_spec("pytest_timeout") is not None:
        # A hung test fails alone, and the phase goes on to the next one and writes its junit file.
        command += [f"--timeout={max(limit // 2, 30)}"]
    run = run_phase(command, limit=limit, env=env, log=log, name="tests")
    results = test_results(junit, run["output"], run["timed_out"])
    counts: dict[str, int] = {}
    for result in results:
        counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
    if cuda:
        ok = bool(results) and not run["timed_out"] and all(r["outcome"] in ("passed", "skipped") for r in results)
    else:
        # No GPU: the check is that every gpu test was collected and skipped, none ran.
        ok = bool(results) and all(r["outcome"] == "skipped" for r in results) and run["returncode"] == 0
    return {
        "ok": ok,
        "marker": marker,
        "counts": counts,
        "results": results,
        **{k: run[k] for k in ("returncode", "timed_out", "seconds")},
    }


def benchmark_phase(mode: str, cuda: bool, env: dict[str, str], log: Log) -> dict[str, Any]:
    profile, batch, steps, warmup = SIZES[mode if cuda else "cpu"]
    spec = {
        "profile": profile,
        "device": "cuda" if cuda else "cpu",
        "bf16": cuda,
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
    }
    command = [sys.executable, str(Path(__file__).resolve()), "--benchmark-child", json.dumps(spec)]
    limit = LIMITS[mode]["benchmark"] if cuda else 120
    run = run_phase(command, limit=limit, env=env, log=log, name="benchmark")
    lines = [line for line in run["output"].splitlines() if line.startswith("{")]
    figures: dict[str, Any] = {}
    if lines:
        try:
            figures = json.loads(lines[-1])
        except json.JSONDecodeError:
            figures = {}
    ok = run["returncode"] == 0 and bool(figures)
    return {"ok": ok, **figures, **{k: run[k] for k in ("returncode", "timed_out", "seconds")}}


# ---------------------------------------------------------------- the benchmark (in its own process)


def matmul_flops_per_s(device: str, seconds: float) -> float:
    """The device's practical matmul peak: bf16 8192 x 8192 on CUDA, fp32 1024 x 1024 on a CPU."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10 if device == "cuda" else 1):
            torch.mm(a, b)
            runs += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start)


def _overrides(spec: dict[str, Any], data: Path, out: Path, steps: int) -> list[str]:
    overrides = [
        f"data.data_path={data}",
        f"data.image_folder={data.parent}",
        f"training.output_dir={out}",
        f"training.device={spec['device']}",
        f"training.bf16={str(spec['bf16']).lower()}",
        f"training.per_device_train_batch_size={spec['batch']}",
        "training.gradient_accumulation_steps=1",
        f"training.max_steps={steps}",
        f"training.save_steps={steps + 1}",
        "training.logging_steps=1",
        "training.warmup_ratio=0",
        "training.warmup_steps=1",
        "training.report_to=none",
    ]
    if spec["profile"] == "local_lite":
        # Random weights stand in for the models; the builtin tokenizer for SmolLM's, which is not here.
        overrides += ["model.tokenizer_name_or_path=builtin:tiny-llama"]
    return overrides


def _recipe(spec: dict[str, Any], overrides: list[str]) -> Any:
    import io

    from rich.console import Console

    from llavactl.config.loader import load_profile
    from llavactl.train.progress import TrainingProgress
    from llavactl.train.recipe import TrainRecipe

    progress = TrainingProgress(Console(file=io.StringIO()), quiet=True)
    return TrainRecipe(load_profile(spec["profile"], overrides), progress, random_weights=spec["profile"] != "tiny")


def llavactl_samples_per_s(spec: dict[str, Any], data: Path, out: Path) -> float:
    """llavactl's loop, timed by its own metrics.jsonl (one line per step), warm-up steps left out."""
    _recipe(spec, _overrides(spec, data, out, spec["steps"] + spec["warmup"])).run()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = lines[spec["warmup"] :]
    seconds = sum(spec["batch"] / line["samples_per_s"] for line in timed)
    return len(timed) * spec["batch"] / seconds


def llavactl_flops_per_sample(spec: dict[str, Any], data: Path, out: Path) -> float:
    """The FLOPs of one llavactl step (its first batch), counted while the recipe runs it."""
    from llavactl.model.flops import flop_counter

    recipe = _recipe(spec, _overrides(spec, data, out, 1))
    counter = flop_counter()
    with counter:
        recipe.run()
    return counter.get_total_flops() / spec["batch"]


def trainer_samples_per_s(spec: dict[str, Any], data: Path, out: Path) -> float:
    """transformers' Trainer on the same model, records, batch, precision and optimizer."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from llavactl.config.loader import load_profile
    from llavactl.data.dataset import Collator, build_dataset
    from llavactl.data.source import open_source
    from llavactl.model.assembly import build_llava

    profile = load_profile(spec["profile"], _overrides(spec, data, out, 1)).profile
    assembled = build_llava(
        profile.model,
        profile.stage,
        image_size=profile.data.image_size,
        seed=profile.seed,
        gradient_checkpointing=profile.training.gradient_checkpointing,
        device=spec["device"],
        random_weights=spec["profile"] != "tiny",
    )
    dataset = build_dataset(
        open_source(profile.data, profile.seed),
        profile.data,
        assembled.tokenizer,
        assembled.image_token_id,
        assembled.image_spec,
    )
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if spec["device"] == "cuda":
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    steps = spec["steps"] + spec["warmup"]
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=spec["batch"],
        max_steps=steps,
        learning_rate=profile.training.learning_rate,
        lr_scheduler_type="cosine",
        max_grad_norm=profile.training.max_grad_norm,
        optim="adamw_torch_fused",
        bf16=spec["bf16"],
        logging_steps=steps + 1,
        save_strategy="no",
        report_to=[],
        use_cpu=spec["device"] == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=profile.seed,
    )
    Trainer(
        model=assembled.model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(assembled.tokenizer.pad_token_id),
        callbacks=[StepClock()],
    ).train()
    timed = step_ends[spec["warmup"] - 1 :]
    return (len(timed) - 1) * spec["batch"] / (timed[-1] - timed[0])


def benchmark_child(spec: dict[str, Any]) -> dict[str, Any]:
    import warnings

    from llavactl.data.synth import write_shapes

    warnings.filterwarnings("ignore")
    device = spec["device"]
    with tempfile.TemporaryDirectory(prefix="llavactl-gpu-bench-") as tmp:
        root = Path(tmp)
        records = spec["batch"] * (spec["steps"] + spec["warmup"])
        data = write_shapes(root / "shapes", n=records, seed=0, image_size=32)
        peak = matmul_flops_per_s(device, 0.5 if spec["profile"] == "tiny" else 1.0)
        flops = llavactl_flops_per_sample(spec, data, root / "flops")
        llavactl = llavactl_samples_per_s(spec, data, root / "llavactl")
        trainer = trainer_samples_per_s(spec, data, root / "trainer")
    return {
        "config": f"{spec['profile']} shapes, {'random weights, ' if spec['profile'] != 'tiny' else ''}"
        f"stage {'lora' if spec['profile'] == 'local_lite' else 'full'}, {'bf16' if spec['bf16'] else 'fp32'}, "
        f"{device}",
        **spec,
        "matmul_flops_per_s": peak,
        "llavactl_flops_per_sample": flops,
        "llavactl_samples_per_s": llavactl,
        "trainer_samples_per_s": trainer,
        "llavactl_vs_trainer": llavactl / trainer,
        "llavactl_mfu": flops * llavactl / peak,
        "trainer_mfu": flops * trainer / peak,
    }


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the gpu tests not marked slow and a short benchmark")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="carried wheels to install (no index)")
    parser.add_argument("--benchmark-child", help=argparse.SUPPRESS)
    parser.add_argument("--environment-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.benchmark_child:
        print(json.dumps(benchmark_child(json.loads(args.benchmark_child))))
        return 0
    if args.environment_child:
        print(json.dumps(environment()))
        return 0

    started = time.perf_counter()
    mode = "quick" if args.quick else "full"
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    folder = out if out is not None else Path(tempfile.mkdtemp(prefix="llavactl-gpu-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    log = Log(folder)
    summary: dict[str, Any] = {"gpu_check": mode}
    try:
        extra_path, carried = install_carried_wheels(args.wheels, log)
        env = child_env(extra_path)
        # In a child: with the carried wheels on its path, and no CUDA context held here during the tests.
        probe = run_phase(
            [sys.executable, __file__, "--environment-child"], limit=30, env=env, log=log, name="environment"
        )
        if probe["returncode"] != 0:
            raise RuntimeError(f"the environment probe failed: {probe['output'].strip()[-800:]}")
        described = json.loads(probe["output"].strip().splitlines()[-1])
        cuda = described["cuda"]
        summary.update(
            gpu_present=cuda,
            gpu=described["gpu"],
            mode=mode if cuda else "cpu-dry",
            carried_wheels=carried,
            environment=described,
        )
        if not cuda:
            summary["note"] = (
                "no CUDA device: CPU dry mode. The gpu tests were only collected and skipped, and the benchmark's "
                "plumbing ran on the CPU with the tiny profile; nothing here ran on a GPU."
            )
        summary["tests"] = tests_phase(mode, cuda, env, log)
        print(f"tests: {summary['tests']['counts']} in {summary['tests']['seconds']} s", flush=True)
        summary["benchmark"] = benchmark_phase(mode, cuda, env, log)
        print(f"benchmark: {'ok' if summary['benchmark']['ok'] else 'failed'}", flush=True)
        summary["ok"] = summary["tests"]["ok"] and summary["benchmark"]["ok"]
    except Exception as exc:  # the summary is still printed: a partial result is a result
        summary["ok"] = False
        summary["error"] = f"{type(exc).__name__}: {exc}"
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["log"] = str(log.path)
    log.close()
    text = json.dumps(summary)
    (folder / "gpu_check.json").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
