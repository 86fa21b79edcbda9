"""Result rows and the Markdown table they print as."""

from __future__ import annotations

import cProfile
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Set by ``--profile``: the pgsched side of every measured run is profiled into it.
profiler: cProfile.Profile | None = None


def timed(fn: Callable[[], Any], *, profile: bool = False) -> float:
    """Seconds one call of ``fn`` takes (profiled when ``profile`` and ``--profile`` are set)."""
    prof = profiler if profile else None
    start = time.perf_counter()
    if prof is not None:
        prof.enable()
    try:
        fn()
    finally:
        if prof is not None:
            prof.disable()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Stats:
    """Figures of the measured runs (one per run)."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def format(self, unit: str) -> str:
        if len(self.values) == 1:
            return f"{self.median:,.0f} {unit}"
        return f"{self.median:,.0f} {unit} ({min(self.values):,.0f}–{max(self.values):,.0f})"


@dataclass(frozen=True)
class Row:
    """One line of the table: pgsched's figure, the raw-SQL ceiling of the same run, the target."""

    workload: str
    what: str
    figure: Stats
    unit: str
    target: str
    ceiling: Stats | None = None

    def cells(self) -> list[str]:
        ceiling = self.ceiling.format(self.unit) if self.ceiling else "–"
        ratio = f"{self.figure.median / self.ceiling.median:.2f}" if self.ceiling else "–"
        return [f"{self.workload} {self.what}", self.figure.format(self.unit), ceiling, ratio, self.target]


def table(rows: list[Row]) -> str:
    lines = [
        "| workload | pgsched: median (min–max) | raw-SQL ceiling: median (min–max) | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)
