"""Result rows and the Markdown table they print as."""

from __future__ import annotations

import cProfile
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Set by ``--profile``: the pgsched side of every measured run is profiled into it.
profiler: cProfile.Profile | None = None
# Profiles written by profiled subprocesses (``--profile``), added to the printed profile.
profile_files: list[str] = []
# Extra sections printed after the table: (title, Markdown body).
sections: list[tuple[str, str]] = []


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

    def format(self, unit: str, digits: int = 0) -> str:
        def f(x: float) -> str:
            return f"{x:,.{digits}f}"

        if len(self.values) == 1:
            return f"{f(self.median)} {unit}"
        return f"{f(self.median)} {unit} ({f(min(self.values))}–{f(max(self.values))})"


@dataclass(frozen=True)
class Row:
    """One line of the table: pgsched's figure, the raw-SQL ceiling of the same run, the target.

    ``batch``: the claim batch size the row used; a pgsched row with a batch and no ceiling gets,
    from ``link_ceilings``, the W3 row measured at that batch size as its ceiling. A W3 row has no
    pgsched figure, only a ceiling.
    """

    workload: str
    what: str
    figure: Stats | None
    unit: str
    target: str
    ceiling: Stats | None = None
    digits: int = 0
    batch: int | None = None

    def cells(self) -> list[str]:
        figure = self.figure.format(self.unit, self.digits) if self.figure else "–"
        ceiling = self.ceiling.format(self.unit, self.digits) if self.ceiling else "–"
        ratio = f"{self.figure.median / self.ceiling.median:.2f}" if self.ceiling and self.figure else "–"
        return [f"{self.workload} {self.what}", figure, ceiling, ratio, self.target]


def link_ceilings(rows: list[Row]) -> list[Row]:
    """Give each pgsched row with a claim batch the W3 ceiling measured at that batch size."""
    w3 = {row.batch: row for row in rows if row.workload == "W3" and row.ceiling is not None}
    out = []
    for row in rows:
        if row.workload != "W3" and row.figure and row.batch is not None and row.ceiling is None:
            match = w3.get(row.batch)
            if match is not None:
                row = dataclasses.replace(
                    row, what=f"{row.what}; ceiling: W3 at batch {row.batch}", ceiling=match.ceiling
                )
        out.append(row)
    return out


def table(rows: list[Row]) -> str:
    lines = [
        "| workload | pgsched: median (min–max) | raw-SQL ceiling: median (min–max) | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)
