"""Ctrl-C and SIGTERM during training: the first asks for a stop after the current step, with a checkpoint.

A second one of the same signal stops at once (the atomic checkpoint writes keep what was saved
intact). Under several processes they all stop after the same step, whichever of them was signalled.
A preemption (SLURM's SIGTERM, then SIGKILL after its grace period) is the same first signal: the
message names the checkpoint that stays the last complete one if the kill comes before the save
ends, and the save says how long after the signal it completed.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from llavactl.errors import Interrupted

if TYPE_CHECKING:
    import torch

    from llavactl.resolve.run import World

# The shell's codes for a process ended by the signal: what a script around `llavactl train` expects.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    """Within ``with``, the first SIGINT or SIGTERM is recorded in :attr:`received` and ``say``s so.

    ``last_saved()``: the run's newest complete checkpoint (None before its first), named in the
    message as what a kill before the coming save leaves."""

    def __init__(self, say: Callable[[str], None], last_saved: Callable[[], Path | None] = lambda: None) -> None:
        self.received: int | None = None
        self._received_at = 0.0
        self._say = say
        self._last_saved = last_saved
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.getsignal(s) for s in EXIT_CODES}
        for s in EXIT_CODES:
            signal.signal(s, self._request_stop)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.received, self._received_at = signum, time.monotonic()
        signal.signal(signum, self._previous[signum])
        name, again = ("Ctrl-C", "Ctrl-C again") if signum == signal.SIGINT else ("SIGTERM", "a second SIGTERM")
        last = self._last_saved()
        kept = (
            f"{last.name} stays the last complete checkpoint"
            if last is not None
            else "the run has no checkpoint yet and would start from step 0"
        )
        self._say(
            f"{name}: stopping after this step to save a checkpoint ({again} stops without saving). If this "
            f"process is killed before the save completes, {kept}."
        )

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 1) if self.received is not None else 0

    def seconds_since(self) -> float:
        """Seconds since the stop signal came (0 when none came)."""
        return time.monotonic() - self._received_at if self.received is not None else 0.0

    def requested(self, world: World, device: torch.device) -> bool:
        """Whether a stop signal came to any process: they must all stop after the same step."""
        from llavactl.train.distributed import sum_across

        if not world.distributed:
            return self.received is not None
        return sum_across(world, [float(self.received is not None)], device)[0] > 0


@contextlib.contextmanager
def signals_held(*, raise_after: bool) -> Iterator[None]:
    """Within: SIGINT and SIGTERM are recorded, not acted on, so that what runs there (closing files,
    releasing the run folder's lock, leaving the process group) completes. After it, with
    ``raise_after``, the first one recorded raises :class:`~llavactl.errors.Interrupted`; without (an
    error is already on its way out, and the process ends with its paragraph and code) it is dropped.
    A launcher stopping its workers sends SIGTERM while they wind down after a failure: raised inside
    a finaliser, it was printed as a traceback."""
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in EXIT_CODES}
    for s in EXIT_CODES:
        signal.signal(s, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if held and raise_after:
        raise Interrupted(held[0])
