"""Records of several parts (shards, mixture sources) numbered end to end."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class Parts:
    """Record ``i`` of parts of ``counts`` records each, laid end to end, as (part, offset in it)."""

    def __init__(self, counts: Iterable[int]) -> None:
        self._starts = np.cumsum([0, *counts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """The part of record ``i`` and its offset there; IndexError outside ``0 .. len - 1``."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, i - int(self._starts[k])
