"""What commands print: tables for people, JSON for programs."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import click
import msgspec

from ..display import error_summary, progress_bar
from ..jobs import Job


def cell(value: Any) -> str:
    """One value as a table shows it."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=False)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def print_json(value: Any) -> None:
    click.echo(msgspec.json.encode(value).decode())


JOB_TABLE = ("id", "queue", "task", "state", "priority", "attempts", "run_at", "progress", "error")
# The ERROR column shows the line that names the error (a traceback's last), cut to this width.
ERROR_WIDTH = 60


def print_jobs(jobs: Iterable[Job], as_json: bool) -> None:
    jobs = list(jobs)
    if as_json:
        print_json(jobs)
        return
    shown = {"progress": lambda j: progress_bar(j.progress), "error": lambda j: error_summary(j.error, ERROR_WIDTH)}
    print_table([[shown[c](j) if c in shown else getattr(j, c) for c in JOB_TABLE] for j in jobs], JOB_TABLE)


def short_id(worker: Any) -> str:
    """The first 8 hex digits of a worker incarnation's id: what `pgsched workers` and `jobs show` print."""
    return str(worker)[:8] if worker else ""
