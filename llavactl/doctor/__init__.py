"""`llavactl doctor`: can this machine run this profile? Checks -> results (status, finding, fix)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llavactl.doctor.results import CheckResult

if TYPE_CHECKING:
    from llavactl.config.schema import Profile
    from llavactl.doctor.facts import MachineFacts
    from llavactl.doctor.memory_checks import MemoryPlanner


def run_checks(
    profile: Profile | None,
    facts: MachineFacts | None = None,
    *,
    offline: bool = False,
    memory_planner: MemoryPlanner | None = None,
) -> list[CheckResult]:
    """Every check for this machine and, when given, the profile. Never downloads anything.

    ``memory_planner`` adds the memory check (dry-run's estimate against free memory).
    """
    from llavactl.doctor.environment import environment_checks
    from llavactl.doctor.facts import probe
    from llavactl.doctor.profile_checks import profile_checks

    facts = facts or probe()
    from llavactl.model.hub import offline as hub_offline

    offline = offline or hub_offline()
    results = environment_checks(facts, profile.training.output_dir if profile else None)
    if profile is not None:
        from llavactl.doctor.distributed_checks import distributed_checks, probe_world

        results += profile_checks(profile, facts, offline=offline)
        results += distributed_checks(profile, facts, probe_world())
        if memory_planner is not None:
            from llavactl.doctor.memory_checks import memory_check

            results.append(memory_check(profile, facts, memory_planner))
    return results


def blocking_failures(results: list[CheckResult]) -> list[CheckResult]:
    """The failures that stop `llavactl train` before it loads anything."""
    return [r for r in results if r.status == "fail" and r.blocking]


__all__ = ["CheckResult", "blocking_failures", "run_checks"]
