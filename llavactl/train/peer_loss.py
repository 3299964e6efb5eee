"""The rule for "another training process is gone": a collective failing with the signs gloo and NCCL give.

The process that failed says why itself; the others learn of it in their next collective and stop
with one paragraph that points at that error, not with a traceback of their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llavactl.errors import TrainingError

if TYPE_CHECKING:
    from llavactl.resolve.run import World

_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted")


def lost_a_peer(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective failing because another process is gone (gloo, NCCL)."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    return (dist_error is not None and isinstance(exc, dist_error)) or any(sign in str(exc) for sign in _SIGNS)


def peer_loss_error(world: World, exc: RuntimeError) -> TrainingError | None:
    """The error this process stops with when ``exc`` means another process of ``world`` ended; None otherwise."""
    if not (world.distributed and lost_a_peer(exc)):
        return None
    return TrainingError(
        f"Process {world.rank} stopped: another process of this {world.size}-process run "
        f"ended ({str(exc).splitlines()[0][:160]}).",
        fix="read the other process's error above; the checkpoints saved so far are kept",
    )
