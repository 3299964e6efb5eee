"""An FSDP checkpoint's save and load at 2 CPU processes: sharded (llavactl) against gathered on rank 0.

- `sharded`: what llavactl writes for `training.distributed: fsdp`: every process writes its shards
  of the trainable weights and AdamW state with torch.distributed.checkpoint
  (`llavactl.train.distributed.sharded_state` / `save_sharded` / `load_sharded`).
- `gathered` (the reference, llavactl's FSDP checkpoint before): the whole trainable state and the
  whole optimizer state gathered into rank 0's CPU memory (`full_state_dict=True, cpu_offload=True`),
  written by rank 0 alone (safetensors + torch.save), and loaded back through rank 0 with
  `set_*_state_dict(full_state_dict=True)`.

The model is a stack of decoder-sized Linear layers, every layer its own FSDP group as llavactl
shards an LLM, trained one step so that AdamW's states exist. Each variant runs in a fresh pair of
processes (gloo), so rank 0's peak RSS is its own. Figures: seconds to save and to load (the
slower process), rank 0's peak RSS above what it held before the save, checkpoint bytes.
Usage: python benchmarks/sharded_checkpoint.py [--quick]. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("sharded", "gathered")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(rank: int, world: int, port: int, variant: str, width: int, layers: int, folder: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    from llavactl.train import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    class Wrapper(nn.Module):  # TokenLoss's shape: the model under `.model`
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).square().mean()

    wrapped = Wrapper()
    for layer in wrapped.model:
        fully_shard(layer)
    fully_shard(wrapped)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    wrapped(torch.randn(4, width)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dist.barrier()
    before = _rss_bytes()
    path = Path(folder)

    started = time.perf_counter()
    if variant == "sharded":
        distributed.save_sharded(distributed.sharded_state(wrapped, optimizer), path)
    else:
        from safetensors.torch import save_file

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(wrapped, options=full)
        optim = get_optimizer_state_dict(wrapped, optimizer, options=full)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, path / "trainable.safetensors")
            torch.save(optim, path / "optimizer.pt")
        del weights, optim
    dist.barrier()
    save_s = time.perf_counter() - started
    save_peak = _peak_rss_bytes() - before

    started = time.perf_counter()
    if variant == "sharded":
        distributed.load_sharded(wrapped, optimizer, path)
    else:
        from safetensors.torch import load_file

        weights = load_file(path / "trainable.safetensors") if rank == 0 else {}
        optim = torch.load(path / "optimizer.pt", weights_only=True) if rank == 0 else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(wrapped, weights, options=options)
        set_optimizer_state_dict(wrapped, optimizer, optim, options=options)
    dist.barrier()
    load_s = time.perf_counter() - started
    result = {"save_s": save_s, "load_s": load_s, "peak_rss_above_before_save": max(save_peak, 0)}
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(variant: str, width: int, layers: int) -> dict[str, float]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, _free_port(), variant, width, layers, folder, out), nprocs=2, join=True)
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(2)]
        size = sum(f.stat().st_size for f in Path(folder).iterdir())
    return {
        "save_s": max(r["save_s"] for r in ranks),
        "load_s": max(r["load_s"] for r in ranks),
        "rank0_peak_rss_gib": ranks[0]["peak_rss_above_before_save"] / 2**30,
        "checkpoint_gib": size / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model: that it runs, not the figures")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    width, layers = (512, 4) if args.quick else (2048, 24)  # 24 x 4.2M = 101M parameters
    repeats = 1 if args.quick else args.repeats
    parameters = layers * (width * width + width)
    print(f"{parameters / 1e6:.0f}M trainable parameters in {layers} FSDP groups, 2 processes, AdamW (12 B/param)")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:  # side by side, alternating
            results[variant].append(_run(variant, width, layers))
    summary: dict[str, object] = {"benchmark": "sharded_checkpoint", "parameters": parameters, "repeats": repeats}
    for variant, runs in results.items():
        for key in runs[0]:
            values = [r[key] for r in runs]
            summary[f"{variant}_{key}"] = min(values)
            summary[f"{variant}_{key}_range"] = [min(values), max(values)]
        r = runs[-1]
        print(
            f"{variant:9s} save {min(x['save_s'] for x in runs):.2f} s, load {min(x['load_s'] for x in runs):.2f} s, "
            f"rank 0 peak RSS +{min(x['rank0_peak_rss_gib'] for x in runs):.2f} GiB, {r['checkpoint_gib']:.2f} GiB"
        )
    summary["rank0_peak_rss_ratio_gathered_to_sharded"] = summary["gathered_rank0_peak_rss_gib"] / max(
        summary["sharded_rank0_peak_rss_gib"], 1e-9
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
