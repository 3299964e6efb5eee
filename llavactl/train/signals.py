"""Ctrl-C and SIGTERM during training: the first asks for a stop after the current step, with a checkpoint.

A second one of the same signal stops at once (the atomic checkpoint writes keep what was saved
intact). Under several processes they all stop after the same step, whichever of them was signalled.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from llavactl.resolve.run import World

# The shell's codes for a process ended by the signal: what a script around `llavactl train` expects.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    """Within ``with``, the first SIGINT or SIGTERM is recorded in :attr:`received` and ``say``s so."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.received: int | None = None
        self._say = say
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
        self.received = signum
        signal.signal(signum, self._previous[signum])
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
        self._say(f"Stopping after this step to save a checkpoint ({again} to stop without saving).")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 1) if self.received is not None else 0

    def requested(self, world: World, device: torch.device) -> bool:
        """Whether a stop signal came to any process: they must all stop after the same step."""
        from llavactl.train.distributed import sum_across

        if not world.distributed:
            return self.received is not None
        return sum_across(world, [float(self.received is not None)], device)[0] > 0
