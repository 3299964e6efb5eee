"""What a doctor check returns: a status, a one-line finding and, for warn and fail, the fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Status = Literal["pass", "warn", "fail", "skipped"]


@dataclass(frozen=True)
class CheckResult:
    """One row of `llavactl doctor`. ``blocking`` fails stop `llavactl train` before it loads."""

    check: str
    status: Status
    finding: str
    fix: str | None = None
    blocking: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def passed(check: str, finding: str, hint: str | None = None) -> CheckResult:
    return CheckResult(check, "pass", finding, hint)


def warned(check: str, finding: str, fix: str) -> CheckResult:
    return CheckResult(check, "warn", finding, fix)


def failed(check: str, finding: str, fix: str, *, blocking: bool = True) -> CheckResult:
    return CheckResult(check, "fail", finding, fix, blocking)


def skipped(check: str, why: str) -> CheckResult:
    return CheckResult(check, "skipped", why)
