"""Training throughput: llavactl's loop vs transformers' Trainer vs a bare PyTorch loop.

All three train the same tiny LLaVA (the `tiny` profile's builtin models, same seed, same stage)
on the same synthetic shapes records, with the same batch size, optimizer and clipping. Each loop
notes the wall-clock time at the end of every optimizer step; samples/s is measured after the
first ``--warmup`` steps, so model building and first-step allocation are left out. The loops run
one after another, ``--repeats`` times in turn, and the best run of each counts (other processes
on a laptop only ever slow a run down).

    python benchmarks/train_throughput.py [--quick] [--steps N] [--batch B] [--repeats R]

Goals: llavactl >= 1.0x Trainer and >= 0.95x the bare loop. The last line of stdout is one JSON
object.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from llavactl.config.loader import LoadedProfile, load_profile
from llavactl.data.synth import write_shapes

LR = 1e-2


def profile(data: Path, out: Path, steps: int, batch: int) -> LoadedProfile:
    return load_profile(
        "tiny",
        [
            f"data.data_path={data}",
            f"training.output_dir={out}",
            f"training.max_steps={steps}",
            f"training.per_device_train_batch_size={batch}",
            "training.gradient_accumulation_steps=1",
            f"training.learning_rate={LR}",
            "training.logging_steps=1",
            f"training.save_steps={steps + 1}",
        ],
    )


def samples_per_s(step_ends: list[float], batch: int, warmup: int) -> float:
    timed = step_ends[warmup - 1 :]
    return (len(timed) - 1) * batch / (timed[-1] - timed[0])


def run_llavactl(loaded: LoadedProfile) -> list[float]:
    from rich.console import Console

    from llavactl.train.metrics import MetricsWriter
    from llavactl.train.progress import TrainingProgress
    from llavactl.train.recipe import TrainRecipe

    step_ends: list[float] = []
    log = MetricsWriter.log

    def timed_log(self: MetricsWriter, step: int, values: dict[str, float]) -> None:
        step_ends.append(time.perf_counter())  # logging_steps=1: once per optimizer step
        log(self, step, values)

    MetricsWriter.log = timed_log  # type: ignore[method-assign]
    try:
        with TrainingProgress(Console(file=io.StringIO())) as progress:
            recipe = TrainRecipe(loaded, progress)
            recipe.setup()
            recipe.train()
            recipe.cleanup()
    finally:
        MetricsWriter.log = log  # type: ignore[method-assign]
    return step_ends


def _model_and_data(loaded: LoadedProfile) -> tuple[Any, Any, Any]:
    from llavactl.data.dataset import Collator, build_dataset
    from llavactl.data.source import open_source
    from llavactl.model.assembly import build_llava

    p = loaded.profile
    assembled = build_llava(p.model, p.stage, image_size=p.data.image_size, seed=p.seed)
    dataset = build_dataset(
        open_source(p.data, p.seed), p.data, assembled.tokenizer, assembled.image_token_id, assembled.image_spec
    )
    return assembled, dataset, Collator(assembled.tokenizer.pad_token_id)


def run_trainer(loaded: LoadedProfile, steps: int, batch: int, out: Path) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    assembled, dataset, collator = _model_and_data(loaded)
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step_ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        logging_steps=steps + 1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=loaded.profile.seed,
    )
    Trainer(
        model=assembled.model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[StepClock()]
    ).train()
    return step_ends


def run_bare(loaded: LoadedProfile, steps: int, batch: int) -> list[float]:
    import torch
    from torch.utils.data import DataLoader

    assembled, dataset, collator = _model_and_data(loaded)
    model = assembled.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=collator)
    model.train()
    step_ends: list[float] = []
    while len(step_ends) < steps:
        for batch_ in loader:
            model(**batch_).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_ends.append(time.perf_counter())
            if len(step_ends) == steps:
                break
    return step_ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 steps, one run of each loop (< 1 min)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    steps, repeats = (30, 1) if args.quick else (args.steps, args.repeats)
    warnings.filterwarnings("ignore")

    import torch

    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_shapes(root / "shapes", n=max(64, steps * args.batch // 2), seed=0, image_size=32)
        for repeat in range(repeats):
            runs = {
                "llavactl": lambda r=repeat: run_llavactl(profile(data, root / f"l{r}", steps, args.batch)),
                "trainer": lambda r=repeat: run_trainer(
                    profile(data, root / f"t{r}", steps, args.batch), steps, args.batch, root / f"t{r}"
                ),
                "bare": lambda r=repeat: run_bare(profile(data, root / f"b{r}", steps, args.batch), steps, args.batch),
            }
            for name, run in runs.items():
                rate = samples_per_s(run(), args.batch, args.warmup)
                best[name] = max(best.get(name, 0.0), rate)
                print(f"run {repeat + 1}/{repeats} {name:8s} {rate:8.1f} samples/s")
    summary = {
        "benchmark": "train_throughput",
        "threads": torch.get_num_threads(),
        "steps": steps,
        "batch": args.batch,
        "llavactl_samples_per_s": best["llavactl"],
        "trainer_samples_per_s": best["trainer"],
        "bare_samples_per_s": best["bare"],
        "llavactl_vs_trainer": best["llavactl"] / best["trainer"],
        "llavactl_vs_bare": best["llavactl"] / best["bare"],
        "goal_vs_trainer": 1.0,
        "goal_vs_bare": 0.95,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
