"""Shared pytest fixtures: YAML files, the synthetic shapes data set. Helpers that are not fixtures
are in ``helpers.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import train_recipe

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def write_yaml(tmp_path: Path):
    """Write a YAML text into tmp_path/NAME and return its path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """The shapes data set (32 px images, seed 0) with ``n`` records, made once per size per session:
    ``shapes_data(24)`` is the path of its JSON file."""
    from llavactl.data.synth import write_shapes

    made: dict[int, Path] = {}

    def make(n: int = 8) -> Path:
        if n not in made:
            made[n] = write_shapes(tmp_path_factory.mktemp(f"shapes{n}"), n=n, seed=0, image_size=32)
        return made[n]

    return make


@pytest.fixture(scope="session")
def shapes(shapes_data: Callable[..., Path]) -> Path:
    """Eight shapes records: what most tests train, export and evaluate on."""
    return shapes_data(8)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A llavactl cache of the test's own (``$LLAVACTL_CACHE``) where even a tiny data file's index and
    token counts are kept; the path of its record indexes."""
    from llavactl.data import cache, json_index, parquet

    monkeypatch.setenv("LLAVACTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "CACHE_MIN_BYTES", 0)
    # A file an earlier test opened is memoised without a cache key: opened anew here, so its index is kept.
    json_index._open.cache_clear()
    parquet._open.cache_clear()
    return tmp_path / "cache" / "records"


@pytest.fixture(scope="session")
def finished_run(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a finished run of `tiny` on ``shapes``: 6 steps, each logged, checkpoints at
    steps 3 and 6. Tests copy it before they change anything in it."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    settings = ["training.max_steps=6", "training.save_steps=3", "training.logging_steps=1"]
    train_recipe([f"data.data_path={shapes}", f"training.output_dir={out}", *settings])
    return out


class _FakeBf16Speed:
    """Stands in for :func:`llavactl.model.flops.bf16_speedup`: bf16 runs ``speedup`` times fp32's
    100 GFLOP/s; ``shapes`` records each (tokens, width, out) asked for."""

    def __init__(self) -> None:
        self.speedup = 2.4
        self.shapes: list[tuple[int, int, int]] = []

    def __call__(self, tokens: int, width: int, out: int):
        from llavactl.model.flops import Bf16Speed

        self.shapes.append((tokens, width, out))
        return Bf16Speed(tokens, width, out, 100e9, self.speedup * 100e9)


@pytest.fixture
def bf16_measured(monkeypatch: pytest.MonkeyPatch) -> _FakeBf16Speed:
    """Doctor's measurement of bf16 against fp32 on this CPU, faked: set ``.speedup`` to the figure
    the machine would show (this one has no native bf16, so the native path needs it faked)."""
    fake = _FakeBf16Speed()
    monkeypatch.setattr("llavactl.model.flops.bf16_speedup", fake)
    return fake
