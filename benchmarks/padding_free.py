"""Padding-free batches against padded ones on this CPU: supervised tokens per second, side by side.

Records shaped like LLaVA-1.5's mix (made by `make_llava_mix.py`: 576 image tokens and short VQA
turns, long descriptions, text-only ShareGPT chats), tokenized by a real 32k Llama SentencePiece
model (mistral-common's) with the vicuna_v1 template and `data.max_seq_len` 2048, through
llavactl's own dataset. The model: an LLM of SmolLM-135M's shapes with random weights (LoRA r16 on
q/k/v/o, gradient checkpointing, as local_lite trains it) and the builtin tiny CLIP tower at 192
px, 576 image tokens, fp32.
One pool of records (``--batches`` batches of ``--batch-size``, drawn at random) is trained three
ways, each on every record of the pool, by llavactl's own step (:class:`TrainingStep`):

- ``random``: padded batches in random order (`group_by_modality_length: false`);
- ``grouped``: padded batches from llavactl's length-grouped sampler (`group_by_modality_length`);
- ``padding_free``: the random order's batches, each packed into one row (`data.padding_free`).

The modes take turns batch by batch so that the machine's drift falls on all three alike. Goals:
padding-free reaches at least 90% of the ideal gain 1/(1 - pad fraction) over random-order padding,
and is never slower than grouped padding.

    python benchmarks/padding_free.py [--quick] [--batches N] [--batch-size B] [--layers L]

`--quick` (under a minute): 2 of SmolLM's 30 layers, 2 batches; its figures show the set-up works.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("random", "grouped", "padding_free")
SPM = Path(__import__("mistral_common").__file__).parent / "data" / "tokenizer.model.v1"


def make_records(folder: Path, fraction: float) -> Path:
    script = Path(__file__).with_name("make_llava_mix.py")
    out = subprocess.run(
        [sys.executable, str(script), str(folder), "--fraction", str(fraction)], check=True, capture_output=True
    )
    return Path(json.loads(out.stdout.decode().strip().splitlines()[-1])["path"])


def tokenizer(folder: Path) -> Any:
    """The 32k Llama SentencePiece tokenizer with `<image>` added and unk as its pad token."""
    from transformers import LlamaTokenizer

    shutil.copy(SPM, folder / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.pad_token = tok.unk_token
    return tok


def build(data_path: Path, layers: int) -> tuple[Any, Any, Any, Any]:
    """The model (SmolLM-135M's shapes, ``layers`` of its 30), the profile, the dataset and its tokenizer."""
    from llavactl.config.loader import load_profile
    from llavactl.data.dataset import build_dataset
    from llavactl.data.source import open_source
    from llavactl.model.assembly import build_llava
    from llavactl.train.loss import llava_of

    profile = load_profile(
        "local_lite",
        [
            f"data.data_path={data_path}",
            f"data.image_folder={data_path.parent}",
            "data.conversation_template=vicuna_v1",
            "data.image_size=192",
            "data.max_seq_len=2048",
            "model.vision_tower=builtin:tiny-clip",
            "model.mm_vision_select_layer=-1",
        ],
    ).profile
    assembled = build_llava(
        profile.model, profile.stage, image_size=192, seed=0, gradient_checkpointing=True, random_weights=True
    )
    language_model = llava_of(assembled.model).model.language_model
    del language_model.layers[layers:]
    language_model.config.num_hidden_layers = layers
    assembled.model.train()
    tok = tokenizer(Path(tempfile.mkdtemp(prefix="llavactl-bench-tok-")))
    dataset = build_dataset(
        open_source(profile.data, 0), profile.data, tok, assembled.image_token_id, assembled.image_spec
    )
    return assembled, profile, dataset, tok


def batches_of(mode: str, pool: list[int], lengths: dict[int, int], modality: dict[int, int], size: int) -> list:
    from llavactl.data.dataset import ResumableSampler

    if mode == "grouped":
        # llavactl's sampler over the pool (its megabatch of 50 batches holds the whole pool).
        signed = [modality[i] for i in pool]
        order = [pool[k] for k in ResumableSampler(signed, size, seed=0, group_by_modality_length=True).order(0)]
    else:
        order = list(pool)
    return [order[k : k + size] for k in range(0, len(order), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 batches (< 1 min; not the measurement)")
    parser.add_argument("--batches", type=int, default=4, help="batches per mode (every record of the pool)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30, help="LLM layers of SmolLM-135M's 30")
    parser.add_argument("--fraction", type=float, default=0.002, help="share of the 665K mix to draw records from")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.layers, args.fraction = 2, 2, 0.0005

    import torch

    from llavactl.data.dataset import Collator
    from llavactl.data.packing import sequence_lengths
    from llavactl.resolve import Precision
    from llavactl.train.loss import TokenLoss, supervised_token_count
    from llavactl.train.optimizer import build_optimizer
    from llavactl.train.step import TrainingStep

    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="llavactl-bench-pf-"))
    try:
        data_path = make_records(folder, args.fraction)
        assembled, profile, dataset, tok = build(data_path, args.layers)
        rng = random.Random(0)
        pool = rng.sample(range(len(dataset)), args.batches * args.batch_size)
        items = {i: dataset[i] for i in pool}
        lengths = {i: len(item["input_ids"]) for i, item in items.items()}
        modality = {i: lengths[i] if items[i]["pixel_values"] is not None else -lengths[i] for i in pool}
        plans = {mode: batches_of(mode, pool, lengths, modality, args.batch_size) for mode in MODES}
        collate = {
            "random": Collator(tok.pad_token_id),
            "grouped": Collator(tok.pad_token_id),
            "padding_free": Collator(tok.pad_token_id, padding_free=True),
        }
        collated = {mode: [collate[mode]([items[i] for i in b]) for b in plans[mode]] for mode in MODES}
        optimizer = build_optimizer(assembled.parameter_groups(), profile.training)
        step = TrainingStep(TokenLoss(assembled.model), optimizer, precision=Precision(), device=torch.device("cpu"))
        step([collated["random"][0]])  # warm up: allocator, thread pool, kernels
        seconds = dict.fromkeys(MODES, 0.0)
        for k in range(args.batches):
            for mode in MODES:
                start = time.perf_counter()
                step([collated[mode][k]])
                seconds[mode] += time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    supervised = {m: sum(supervised_token_count(b) for b in collated[m]) for m in MODES}
    real = sum(lengths.values())
    computed = {m: sum(sum(sequence_lengths(b)) for b in collated[m]) for m in MODES}
    pad_fraction = {m: 1 - real / computed[m] for m in MODES}
    rate = {m: supervised[m] / seconds[m] for m in MODES}
    ideal_gain = 1 / (1 - pad_fraction["random"])
    gain = rate["padding_free"] / rate["random"]
    texts = sum(1 for i in pool if items[i]["pixel_values"] is None)
    print(
        f"{len(pool)} records ({texts} text-only), {args.batches} batches of {args.batch_size}, "
        f"{args.layers} LLM layers, {torch.get_num_threads()} threads; lengths "
        f"{min(lengths.values())}-{max(lengths.values())} tokens"
    )
    for m in MODES:
        print(
            f"{m:13s} pad {pad_fraction[m]:6.1%}  {seconds[m]:7.2f} s  {rate[m]:8.1f} supervised tokens/s  "
            f"x{rate[m] / rate['random']:.2f}"
        )
    print(f"ideal gain over random padding 1/(1 - pad) = x{ideal_gain:.2f}; padding-free x{gain:.2f}")
    over_grouped = rate["padding_free"] / rate["grouped"]
    summary = {
        "benchmark": "padding_free",
        "quick": args.quick,
        "records": len(pool),
        "text_only": texts,
        "batch_size": args.batch_size,
        "llm_layers": args.layers,
        "threads": torch.get_num_threads(),
        "pad_fraction": pad_fraction,
        "seconds": seconds,
        "supervised_tokens": supervised["random"],
        "supervised_tokens_per_s": rate,
        "ideal_gain": ideal_gain,
        "gain": gain,
        "gain_over_grouped": over_grouped,
        "gain_share_of_ideal": gain / ideal_gain,
        # Two batches of a few layers show the set-up works (--quick); they are not the measurement.
        "goal_met": None if args.quick else gain >= 0.9 * ideal_gain and over_grouped >= 1.0,
        "wall_s": time.perf_counter() - started,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
