"""Fixtures of the training tests that start several processes: the 16 shapes records they train on,
and the one-process run that they train the same as."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import shapes16_overrides, train_recipe


@pytest.fixture(scope="session")
def shapes16(shapes_data: Callable[..., Path]) -> Path:
    # 16 records: 4 steps of 4 records, one epoch; batches of 2 shared by 2 processes leave none out.
    return shapes_data(16)


@pytest.fixture(scope="session")
def one_process(shapes16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, micro-batches of 2, accumulation 2: 4 records a step."""
    out = tmp_path_factory.mktemp("one")
    train_recipe(shapes16_overrides(shapes16, out, "training.gradient_accumulation_steps=2"))
    return out
