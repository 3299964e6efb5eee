"""Checks of the training world: how many processes, whether their backend works, the global batch.

Under torchrun (or ``llavactl train --nproc-per-node N``) every process runs doctor first, with
``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` set; outside it the world is one process. The rules of a
multi-process world (one process per GPU, the backend, FSDP's limits) are the resolution's.
"""

from __future__ import annotations

from llavactl.doctor.results import CheckResult, failed, passed, warned
from llavactl.resolve.run import MISSING_BACKEND_FIX, SHARED_STORE_FIX, ResolvedRun, missing_backend, restart_can_hang


def _rows(resolved: ResolvedRun, check: str) -> list[CheckResult]:
    return [failed(check, p.problem.message, p.problem.fix) for p in resolved.problems_for(check)]


def world_check(resolved: ResolvedRun) -> list[CheckResult]:
    world = resolved.world
    if not world.distributed:
        return [
            passed(
                "world",
                "1 process",
                hint="`llavactl train --nproc-per-node N` or torchrun trains on N (docs/distributed.md)",
            )
        ]
    described = f"{world.size} processes ({world.local_size} on this node), {world.strategy}"
    rows = _rows(resolved, "world")
    if (hang := restart_can_hang(resolved.world_facts)) is not None:
        rows.append(warned("world", f"{described}; {hang}", SHARED_STORE_FIX))
    return rows or [passed("world", described)]


def backend_check(resolved: ResolvedRun) -> list[CheckResult]:
    device, backend = resolved.device_type, resolved.backend
    if resolved.world.distributed:
        return _rows(resolved, "distributed backend") or [passed("distributed backend", f"{backend} ({device})")]
    if backend in resolved.world_facts.backends:
        return [passed("distributed backend", f"{backend} ({device})")]
    finding = f"{missing_backend(backend, device)} One process trains without it."
    return [warned("distributed backend", finding, MISSING_BACKEND_FIX)]


def global_batch_check(resolved: ResolvedRun) -> CheckResult:
    profile, world = resolved.loaded.profile, resolved.world
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


def distributed_checks(resolved: ResolvedRun) -> list[CheckResult]:
    return [*world_check(resolved), *backend_check(resolved), global_batch_check(resolved)]
