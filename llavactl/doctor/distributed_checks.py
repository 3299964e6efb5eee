"""Checks of the training world: how many processes, whether their backend works, the global batch.

Under torchrun (or ``llavactl train --nproc-per-node N``) every process runs doctor first, with
``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` set; outside it the world is one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llavactl.config.schema import Profile
from llavactl.doctor.facts import MachineFacts
from llavactl.doctor.profile_checks import resolve_device
from llavactl.doctor.results import CheckResult, failed, passed, warned


@dataclass(frozen=True)
class WorldFacts:
    size: int  # processes in all (WORLD_SIZE), 1 outside torchrun
    local_size: int  # processes on this node (LOCAL_WORLD_SIZE)
    backends: frozenset[str]  # torch.distributed backends this torch build has


def probe_world() -> WorldFacts:
    """The world torchrun describes in the environment, and the backends torch has (imports torch)."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    backends = frozenset(b for b in ("gloo", "nccl") if dist.is_available() and dist.is_backend_available(b))
    return WorldFacts(size, local, backends)


def world_check(profile: Profile, facts: MachineFacts, world: WorldFacts) -> CheckResult:
    strategy = profile.training.distributed
    device = resolve_device(profile.training.device, facts)
    if world.size == 1:
        return passed(
            "world",
            "1 process",
            hint="`llavactl train --nproc-per-node N` or torchrun trains on N (docs/distributed.md)",
        )
    if device == "cuda" and world.local_size > len(facts.gpus):
        return failed(
            "world",
            f"{world.local_size} processes on this node but {len(facts.gpus)} CUDA devices: one process per GPU.",
            f"start `--nproc-per-node {len(facts.gpus)}`" if facts.gpus else "add `training.device=cpu`",
        )
    if strategy == "fsdp" and profile.stage != "full":
        return failed(
            "world",
            f"training.distributed `fsdp` shards stage `full`; this profile trains stage `{profile.stage}`.",
            "add `training.distributed=ddp`, or `stage=full`",
        )
    if strategy == "fsdp" and profile.training.fp16:
        return failed("world", "FSDP runs with bf16 or fp32 here, not fp16.", "add `training.fp16=false`")
    return passed("world", f"{world.size} processes ({world.local_size} on this node), {strategy}")


def backend_check(profile: Profile, facts: MachineFacts, world: WorldFacts) -> CheckResult:
    device = resolve_device(profile.training.device, facts)
    backend = "nccl" if device == "cuda" else "gloo"
    if backend in world.backends:
        return passed("distributed backend", f"{backend} ({device})")
    finding = f"this torch build has no `{backend}` backend, which multi-process training on {device} needs."
    fix = "install an official torch wheel (gloo everywhere, nccl in the CUDA builds)"
    if world.size > 1:
        return failed("distributed backend", finding, fix)
    return warned("distributed backend", finding + " One process trains without it.", fix)


def global_batch_check(profile: Profile, world: WorldFacts) -> CheckResult:
    t = profile.training
    intended = profile.global_batch_size  # what the profile trains with on one process
    actual = intended * world.size
    formula = (
        f"{actual} = {t.per_device_train_batch_size} per device x {t.gradient_accumulation_steps} accumulation "
        f"x {world.size} process{'es' if world.size > 1 else ''}"
    )
    if actual == intended:
        return passed("global batch", formula)
    fixes = []
    if intended % (t.per_device_train_batch_size * world.size) == 0:
        fixes.append(
            f"`training.gradient_accumulation_steps={intended // (t.per_device_train_batch_size * world.size)}`"
        )
    elif intended % world.size == 0:
        fixes.append(
            f"`training.per_device_train_batch_size={intended // world.size} training.gradient_accumulation_steps=1`"
        )
    keep = f"add {fixes[0]} to keep the profile's {intended}, or " if fixes else ""
    return warned(
        "global batch",
        f"{formula}: {world.size} times the profile's {intended} samples per step, which its learning rate is set for.",
        f"{keep}scale `training.learning_rate` for the larger batch if it is intended",
    )


def distributed_checks(profile: Profile, facts: MachineFacts, world: WorldFacts) -> list[CheckResult]:
    return [
        world_check(profile, facts, world),
        backend_check(profile, facts, world),
        global_batch_check(profile, world),
    ]
