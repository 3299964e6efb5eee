"""`llavactl doctor`: can this machine run this profile? Checks -> results (status, finding, fix).

The machine rules are the resolution's (:func:`llavactl.resolve.resolve`); doctor shows its
problems as rows and adds only the checks nobody else needs: packages, disk, RAM, data files,
model files, the memory estimate against free memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llavactl.doctor.results import CheckResult
from llavactl.errors import CheckFailed

if TYPE_CHECKING:
    from llavactl.config.loader import LoadedProfile
    from llavactl.doctor.memory_checks import MemoryPlanner
    from llavactl.resolve import MachineFacts, ResolvedRun, WorldFacts


def run_checks(
    loaded: LoadedProfile | None,
    facts: MachineFacts | None = None,
    world: WorldFacts | None = None,
    *,
    offline: bool = False,
    memory_planner: MemoryPlanner | None = None,
) -> list[CheckResult]:
    """Every check for this machine and, when given, the profile. Never downloads anything.

    ``memory_planner`` adds the memory check (dry-run's estimate against free memory).
    """
    from llavactl.resolve import resolve
    from llavactl.resolve.facts import probe

    facts = facts or probe()
    return checks_of(
        resolve(loaded, facts, world) if loaded else None, facts, offline=offline, memory_planner=memory_planner
    )


def checks_of(
    resolved: ResolvedRun | None,
    facts: MachineFacts,
    *,
    offline: bool = False,
    memory_planner: MemoryPlanner | None = None,
) -> list[CheckResult]:
    """Doctor's rows for a run already resolved (or for the machine alone when ``resolved`` is None)."""
    from llavactl.doctor.environment import environment_checks
    from llavactl.model.hub import offline as hub_offline

    offline = offline or hub_offline()
    output_dir = resolved.loaded.profile.training.output_dir if resolved else None
    results = environment_checks(facts, output_dir)
    if resolved is not None:
        from llavactl.doctor.distributed_checks import distributed_checks
        from llavactl.doctor.profile_checks import profile_checks

        results += profile_checks(resolved, offline=offline)
        results += distributed_checks(resolved)
        if memory_planner is not None:
            from llavactl.doctor.memory_checks import memory_check

            results.append(memory_check(resolved, memory_planner))
    return results


def blocking_failures(results: list[CheckResult]) -> list[CheckResult]:
    """The failures that stop `llavactl train` before it loads anything."""
    return [r for r in results if r.status == "fail" and r.blocking]


def verdict(results: list[CheckResult]) -> CheckFailed | None:
    """Doctor's answer: None when no check failed, else the error naming the failed checks (exit code 1)."""
    failures = [r for r in results if r.status == "fail"]
    if not failures:
        return None
    names = ", ".join(dict.fromkeys(r.check for r in failures))
    return CheckFailed(
        f"{len(failures)} check{'s' if len(failures) > 1 else ''} failed: {names}.",
        fix="apply the fix of each failed check above, then run doctor again",
    )


def preflight(resolved: ResolvedRun, memory_planner: MemoryPlanner) -> list[CheckResult]:
    """The checks `llavactl train` runs before it loads anything: the warnings, to show; a blocking
    failure raises :class:`CheckFailed` listing each one with its fix."""
    results = checks_of(resolved, resolved.facts, memory_planner=memory_planner)
    failures = blocking_failures(results)
    if failures:
        lines = "\n".join(f"  - {r.check}: {r.finding}\n    Fix: {r.fix}" for r in failures)
        raise CheckFailed(
            f"llavactl doctor found {len(failures)} problem{'s' if len(failures) > 1 else ''} that stop this run:\n"
            + lines,
            fix="apply the fixes above (or run `llavactl doctor --profile ...` for every check); "
            "`--skip-doctor` starts anyway",
        )
    return [r for r in results if r.status == "warn"]


__all__ = ["CheckResult", "blocking_failures", "checks_of", "preflight", "run_checks", "verdict"]
