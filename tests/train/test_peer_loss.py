"""The peer-loss rule: a collective failing because another training process is gone."""

from __future__ import annotations

from llavactl.resolve.run import World
from llavactl.train.peer_loss import peer_loss_error

TWO = World(size=2, local_size=2, rank=1, local_rank=1, backend="gloo", strategy="ddp")


def test_a_lost_peer_is_one_paragraph_naming_this_process_and_the_run() -> None:
    error = peer_loss_error(TWO, RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer\nmore"))
    assert error is not None
    assert error.message == (
        "Process 1 stopped: another process of this 2-process run ended "
        "([../gloo/transport/tcp/pair.cc:534] Connection closed by peer)."
    )
    assert error.fix == "read the other process's error above; the checkpoints saved so far are kept"


def test_other_errors_and_one_process_runs_are_not_a_lost_peer() -> None:
    assert peer_loss_error(TWO, RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert peer_loss_error(World(), RuntimeError("Connection reset by peer")) is None
