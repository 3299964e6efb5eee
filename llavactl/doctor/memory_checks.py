"""The memory check: dry-run's estimated peak against the free memory of the device the run uses.

The estimate comes from the training side (:func:`llavactl.train.plan.plan_memory`), handed in by
the CLI, so that doctor does not depend on the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from llavactl.doctor.profile_checks import resolve_device
from llavactl.doctor.results import CheckResult, failed, passed, skipped, warned

if TYPE_CHECKING:
    from llavactl.config.schema import Profile
    from llavactl.doctor.facts import MachineFacts

GIB = 1024**3
# (profile, free bytes, device) -> (estimated peak bytes, overrides that would fit or None)
MemoryPlanner = Callable[["Profile", int, str], tuple[int, str | None]]
# The estimate is within 20% of measured peaks (benchmarks/memory_estimate.py): closer than this
# to the limit is a warning, not a pass.
MARGIN = 0.8


def memory_check(profile: Profile, facts: MachineFacts, planner: MemoryPlanner) -> CheckResult:
    device = resolve_device(profile.training.device, facts)
    if device == "cpu":
        free, where = facts.ram_available_bytes, "available RAM"
    elif device == "cuda" and facts.gpus:
        free, where = facts.gpus[0].free_bytes, f"free memory of {facts.gpus[0].name}"
    else:
        return skipped(
            "memory", f"no {device} device here to compare with; `llavactl dry-run --device-memory GIB` plans for one"
        )
    peak, fits_with = planner(profile, free, device)
    finding = f"estimated peak {peak / GIB:.2f} GiB against {free / GIB:.2f} GiB {where}"
    if peak <= free * MARGIN:
        return passed("memory", finding)
    if peak <= free:
        return warned(
            "memory", finding + ": within the estimate's 20% error", fits_with or "free memory before the run"
        )
    fix = f"add `{fits_with}`" if fits_with else "no override fits: use a device with more memory (docs/dry-run.md)"
    return failed("memory", finding + ".", fix)
