"""Charts of a run's figures over its steps: as text for a terminal (or a pipe), and as a PNG.

A text chart is plain ASCII (no colour, no escape sequences), so that it reads the same over SSH,
in a log file and piped into ``less``; several series share one chart with a marker each. The PNG
uses matplotlib, an optional extra (``pip install 'llavactl[plots]'``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llavactl.errors import ConfigError, OutputError
from llavactl.train.run_state import CHARTED, RunDetail, smoothed

Points = Sequence[tuple[float, float]]
MARKERS = "*o+x#@%&"
PLOTS_EXTRA = "pip install 'llavactl[plots]'"
# Inches and dots per inch of one chart in a PNG: 1000 x 260 pixels.
PNG_WIDTH, PNG_PANEL_HEIGHT, PNG_DPI = 10.0, 2.6, 100


@dataclass(frozen=True)
class Series:
    name: str
    points: Points
    marker: str = "*"


@dataclass(frozen=True)
class Chart:
    """A chart laid out on a grid of ``width`` x ``height`` characters: each series' points fall
    into columns (their mean where several share one), and each column's value into a row."""

    title: str
    series: tuple[Series, ...]
    width: int
    height: int

    @property
    def x_range(self) -> tuple[float, float]:
        xs = [x for s in self.series for x, _ in s.points]
        return (min(xs), max(xs)) if xs else (0.0, 0.0)

    @property
    def y_range(self) -> tuple[float, float]:
        ys = [y for s in self.series for _, y in s.points if math.isfinite(y)]
        return (min(ys), max(ys)) if ys else (0.0, 0.0)

    def columns(self, series: Series) -> dict[int, float]:
        """The column of each of ``series``' points and the mean value drawn there."""
        low, high = self.x_range
        span = high - low
        sums: dict[int, list[float]] = {}
        for x, y in series.points:
            if not math.isfinite(y):
                continue  # a NaN or infinite loss (a bad step) has no place on the axis
            column = 0 if span == 0 else round((x - low) / span * (self.width - 1))
            sums.setdefault(column, []).append(y)
        return {c: sum(v) / len(v) for c, v in sorted(sums.items())}

    def row(self, value: float) -> int:
        """The row a value is drawn in, 0 at the top (the largest value)."""
        low, high = self.y_range
        return 0 if high == low else round((high - value) / (high - low) * (self.height - 1))

    def render(self) -> list[str]:
        grid = [[" "] * self.width for _ in range(self.height)]
        for series in self.series:
            for column, value in self.columns(series).items():
                grid[self.row(value)][column] = series.marker
        low, high = self.y_range
        marks = {0: high, self.height - 1: low}
        if self.height > 2:
            marks[(self.height - 1) // 2] = (high + low) / 2
        number = _number_format(list(marks.values()))
        labels = {row: number(value) for row, value in marks.items()}
        pad = max(len(t) for t in labels.values())
        legend = "  ".join(f"{s.marker} {s.name}" for s in self.series) if len(self.series) > 1 else ""
        lines = [f"{self.title}" + (f"   {legend}" if legend else "")]
        lines += [f"{labels.get(r, ''):>{pad}} |{''.join(cells).rstrip()}" for r, cells in enumerate(grid)]
        first, last = self.x_range
        axis = f"{'':>{pad}} +{'-' * self.width}"
        left, right = f"step {first:g}", f"{last:g}"
        lines += [axis, f"{'':>{pad}}  {left}{right:>{max(1, self.width - len(left))}}"]
        return lines


def chart(title: str, series: Sequence[Series], *, columns: int = 80, height: int = 8) -> Chart:
    """A text chart that fits ``columns`` characters with its value labels."""
    ys = [y for s in series for _, y in s.points if math.isfinite(y)]
    number = _number_format(ys)
    labels = max((len(number(y)) for y in (min(ys), max(ys))), default=1) if ys else 1
    return Chart(title, tuple(series), max(10, columns - labels - 3), height)


def _number_format(values: Sequence[float]) -> Callable[[float], str]:
    """One format for a chart's labels: plain figures, or powers of ten when some value needs them."""
    big_or_small = any(v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2) for v in values)
    return (lambda v: f"{v:.2e}") if big_or_small else (lambda v: f"{v:.4g}")


def write_png(charts: Sequence[Chart], path: Path | BinaryIO) -> None:
    """The charts one above the other in one PNG (a file, or into a binary stream), ``PNG_WIDTH`` x
    ``PNG_PANEL_HEIGHT`` inches each at ``PNG_DPI``; each series a line, named in the legend."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write files only
        from matplotlib import pyplot as plt
    except ImportError:
        raise ConfigError(
            "writing a PNG needs matplotlib, which is not installed", fix=f"`{PLOTS_EXTRA}`, or leave out --png"
        ) from None
    figure, axes = plt.subplots(
        len(charts), 1, figsize=(PNG_WIDTH, PNG_PANEL_HEIGHT * len(charts)), dpi=PNG_DPI, squeeze=False
    )
    try:
        for ax, one in zip(axes[:, 0], charts, strict=True):
            for series in one.series:
                xs = [x for x, _ in series.points]
                ys = [y for _, y in series.points]
                ax.plot(xs, ys, label=series.name, linewidth=1.2)
            ax.set_title(one.title, fontsize=10, loc="left")
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
            if len(one.series) > 1:
                ax.legend(fontsize=8)
        figure.tight_layout()
        try:
            figure.savefig(path, dpi=PNG_DPI)
        except OSError as exc:
            raise OutputError(
                f"--png {path} cannot be written ({exc.strerror or exc})", fix="give a path in a folder you can write"
            ) from None
    finally:
        plt.close(figure)


def run_charts(run: RunDetail, *, columns: int = 80) -> list[Chart]:
    """The charts of ``runs show``: loss (raw and smoothed), learning rate, grad norm, throughput, MFU."""
    charts = []
    loss = run.series("loss")
    if loss:
        smooth = list(zip([x for x, _ in loss], smoothed([y for _, y in loss]), strict=True))
        charts.append(chart("loss", [Series("raw", loss, "."), Series("smoothed", smooth, "*")], columns=columns))
    for key, label in CHARTED[1:]:
        if points := run.series(key):
            charts.append(chart(label, [Series(label, points)], columns=columns))
    if mfu := run.series("mfu"):
        charts.append(chart("MFU (%)", [Series("MFU", [(x, 100 * y) for x, y in mfu])], columns=columns))
    return charts


def loss_overlay(runs: Sequence[RunDetail], names: Sequence[str], *, columns: int = 80) -> Chart:
    """The runs' losses (smoothed) on one chart, a marker each."""
    series = []
    for k, (run, name) in enumerate(zip(runs, names, strict=True)):
        loss = run.series("loss")
        smooth = list(zip([x for x, _ in loss], smoothed([y for _, y in loss]), strict=True))
        series.append(Series(name, smooth, MARKERS[k % len(MARKERS)]))
    return chart("loss (smoothed)", series, columns=columns)
