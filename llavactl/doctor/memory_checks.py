"""The memory check: dry-run's estimated peak against the free memory of the device the run uses.

The estimate comes from the planner (:func:`llavactl.plan.plan_memory`), handed in by the CLI, so
that doctor does not depend on it; the free memory is the resolution's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from llavactl.doctor.results import CheckResult, failed, passed, skipped, warned
from llavactl.errors import LlavactlError
from llavactl.resolve.run import memory_fit

if TYPE_CHECKING:
    from llavactl.resolve.run import ResolvedRun

GIB = 1024**3
# resolved run -> (estimated peak bytes, overrides that would fit or None)
MemoryPlanner = Callable[["ResolvedRun"], tuple[int, str | None]]


def memory_check(resolved: ResolvedRun, planner: MemoryPlanner) -> CheckResult:
    free = resolved.free_memory_bytes
    if free is None:
        return skipped(
            "memory",
            f"{resolved.memory_where} to compare with; `llavactl dry-run --device-memory GIB` plans for one",
        )
    try:
        peak, fits_with = planner(resolved)
    except LlavactlError as exc:  # a record the planner cannot encode: another row names the cause
        return failed("memory", f"not estimated: {exc.message}", exc.fix or "fix the profile, then run doctor again")
    finding = f"estimated peak {peak / GIB:.2f} GiB against {free / GIB:.2f} GiB {resolved.memory_where}"
    fit = memory_fit(peak, free)
    if fit == "fits":
        return passed("memory", finding)
    if fit == "tight":
        return warned(
            "memory", finding + ": within the estimate's 20% error", fits_with or "free memory before the run"
        )
    fix = f"add `{fits_with}`" if fits_with else "no override fits: use a device with more memory (docs/dry-run.md)"
    return failed("memory", finding + ".", fix)
