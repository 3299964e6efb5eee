"""Training on several processes: the process group, who this process is, and the model wrappers.

``torchrun`` (or ``llavactl train --nproc-per-node N``, which starts it) runs one process per
device and tells each its place in ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. Every process
builds the same model from the same seed, trains on its own share of each step's batches, and
the gradients are summed across processes before every optimizer step:

- ``ddp``: DistributedDataParallel; each process holds the whole model and optimizer.
- ``fsdp``: FSDP2 (``fully_shard``); parameters, gradients and optimizer states are sharded,
  one group per LLM decoder layer, the rest in the root group. With ``training.bf16`` the
  gathered parameters are bf16 and gradients are reduced in fp32.

The world (rank, size, backend: nccl on CUDA, gloo on the CPU, strategy) is resolved with the
profile (:class:`llavactl.resolve.World`). For one process nothing here starts a process group
and the helpers do nothing, so one code path serves both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llavactl.errors import ConfigError
from llavactl.model.weights import SHARDED_WEIGHTS
from llavactl.resolve.run import World
from llavactl.train.loss import TokenLoss, llava_of


def start(world: World) -> None:
    """Join the process group of ``world`` (resolved from torchrun's environment); nothing for one process."""
    import torch.distributed as dist

    if not world.distributed:
        return
    if world.backend == "nccl":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process {world.rank} is local rank {world.local_rank}, but this node has "
                f"{torch.cuda.device_count()} CUDA devices.",
                fix="start at most one process per GPU: `--nproc-per-node` no larger than the GPU count",
            )
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        store = restart_safe_store()
        if store is None:
            dist.init_process_group(world.backend)
        else:
            dist.init_process_group(world.backend, store=store, rank=world.rank, world_size=world.size)


def restart_safe_store() -> Any:
    """Under torchrun on one node: the agent's store, its keys scoped to this restart; None elsewhere.

    torchrun's agent keeps one store for the workers of all its restarts (it shares the rendezvous's
    TCPStore, ``TORCHELASTIC_USE_AGENT_STORE=True``) and torch puts no per-restart prefix on the keys
    the process group's set-up writes there, so the workers of a restart read the addresses of the
    processes they replace and hang in ``init_process_group`` (pytorch/pytorch#135712). With one
    agent, every worker has the same ``TORCHELASTIC_RESTART_COUNT``, which scopes the keys. With
    several nodes the agents count restarts each for itself, so nothing here can scope them: there
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` before torchrun gives every restart a fresh store
    (doctor's `world` row warns of it: :func:`llavactl.resolve.run.restart_can_hang`; docs/distributed.md).
    """
    import os
    from datetime import timedelta

    import torch.distributed as dist

    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    client = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        int(env["WORLD_SIZE"]),
        is_master=False,
        timeout=timedelta(minutes=10),
    )
    return dist.PrefixStore(f"llavactl/restart-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def stop(world: World) -> None:
    """Leave the process group (a no-op for one process)."""
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.distributed:
        dist.barrier()


def sum_across(world: World, values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed element-wise over all processes (returned unchanged for one process)."""
    import torch.distributed as dist

    if not world.distributed:
        return list(values)
    # float64 keeps token counts exact well past 2**24.
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_from_main(world: World, values: list[Any]) -> list[Any]:
    """Rank 0's ``values`` (picklable) on every process; unchanged for one process."""
    import torch.distributed as dist

    if not world.distributed:
        return values
    shared = list(values)
    dist.broadcast_object_list(shared, src=0)
    return shared


def gather_to_main(world: World, value: Any) -> list[Any] | None:
    """Every process's ``value`` on rank 0, in rank order; None on the other ranks."""
    import torch.distributed as dist

    if not world.distributed:
        return [value]
    gathered: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def wrap(
    module: TokenLoss,
    world: World,
    device: torch.device,
    *,
    find_unused: bool,
    bf16: bool = False,
) -> nn.Module:
    """``module`` ready for data-parallel training; unchanged for one process.

    ``find_unused``: some batches leave trainable parameters without a gradient (the projector
    on a text-only batch), which DDP must be told about. ``bf16`` (``training.bf16``): FSDP
    computes with bf16 copies of the parameters (DDP's autocast does that per op).
    """
    if not world.distributed:
        return module
    if world.sharded:
        return _fully_shard(module, bf16=bf16)
    from torch.nn.parallel import DistributedDataParallel

    # DDP broadcasts rank 0's parameters and buffers here, so every process starts identical.
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
    )


def _fully_shard(module: TokenLoss, *, bf16: bool) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    llava = llava_of(module.model)
    # bf16: parameters are gathered (half the traffic) and used in bf16, while the shards, the
    # optimizer and the reduced gradients stay fp32: bf16 sums over many processes lose the
    # small gradients. Without it FSDP gathers fp32 and autocast casts each op's weights anew.
    policy = MixedPrecisionPolicy()
    if bf16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # One group per decoder layer: only one layer's full parameters exist at a time. The tower,
    # projector, embeddings and head form the root group (sharding the tower on its own changes
    # its class, and transformers then no longer records its hidden states).
    for layer in llava.model.language_model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def gradient_sync(wrapped: nn.Module, *, sync: bool) -> Any:
    """A context for one micro-batch: gradients are reduced across processes only when ``sync``."""
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel) and not sync:
        return wrapped.no_sync()
    set_sync: Callable[[bool], None] | None = getattr(wrapped, "set_requires_gradient_sync", None)
    if set_sync is not None:  # FSDP2
        set_sync(sync)
    return nullcontext()


def as_float(norm: torch.Tensor) -> float:
    """A gradient norm as a float; FSDP returns it as a replicated DTensor."""
    full_tensor = getattr(norm, "full_tensor", None)
    return float(full_tensor() if callable(full_tensor) else norm)


# The sharded checkpoint's two parts (torch.distributed.checkpoint flattens them to "weights.<name>").
OPTIMIZER_KEY = "optimizer"
_TOKEN_LOSS_PREFIX = "model."  # TokenLoss's attribute: the LLaVA model's names follow it


def sharded_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The sharded model's trainable weights (in the LLaVA model's names) and its optimizer's
    state, each process holding its shards: what :func:`save_sharded` writes and
    :func:`load_sharded` fills. Every process calls it; nothing is gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(wrapped, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    # The state dict also lists a tied weight under its second name (lm_head.weight), which
    # named_parameters, and so the single-process checkpoint, has once.
    names = {name for name, parameter in wrapped.model.named_parameters() if parameter.requires_grad}
    start = len(_TOKEN_LOSS_PREFIX)
    trainable = {key[start:]: value for key, value in weights.items() if key[start:] in names}
    return {SHARDED_WEIGHTS: trainable, OPTIMIZER_KEY: optim}


def save_sharded(state: dict[str, Any], folder: Path) -> None:
    """Every process writes its shards of ``state`` into ``folder`` (one ``__<rank>_0.distcp`` file
    each, in parallel; rank 0 adds ``.metadata``), with torch.distributed.checkpoint. Collective:
    it returns once every process has written."""
    import torch.distributed.checkpoint as dcp

    _raise_first_failure(lambda: dcp.save(state, checkpoint_id=folder))


def _raise_first_failure(run: Callable[[], object]) -> None:
    """``run()``; torch.distributed.checkpoint's failure (a BaseException that every process gets,
    holding the errors of all) raised as the first process's own error: a full disk reads as one."""
    import warnings

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process"
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            run()
    except CheckpointException as exc:
        [(first, _trace), *_] = exc.failures.values()
        if isinstance(first, Exception):
            raise first from None
        raise


def load_full_optimizer_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole optimizer state keyed by parameter name (what FSDP checkpoints held in
    optimizer.pt before they were sharded) into the sharded optimizer (every process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_sharded(wrapped: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load a checkpoint of :func:`save_sharded` into the sharded model and optimizer, on any number
    of processes (torch.distributed.checkpoint reads each process's part of every tensor, whatever
    the sharding it was saved with). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = sharded_state(wrapped, optimizer)  # the optimizer's states made (zero), to be filled
    _raise_first_failure(lambda: dcp.load(state, checkpoint_id=folder))
    weights = {_TOKEN_LOSS_PREFIX + name: value for name, value in state[SHARDED_WEIGHTS].items()}
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(wrapped, optimizer, model_state_dict=weights, optim_state_dict=state[OPTIMIZER_KEY], options=options)
