"""The scenarios' kit (issue 19): a ``Scenario`` (processes, enqueuer, harness connection,
timeline), its fixtures' bodies, and the helpers the scenario files share."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from .checker import Report, check
from .harness import (
    Cluster,
    Enqueuer,
    Settings,
    Timeline,
    create_schema,
    harness_connection,
    leaked_secrets,
    load,
)

FULL = os.environ.get("PGSCHED_CHAOS") == "full"


def size(quick: Any, full: Any) -> Any:
    return full if FULL else quick


@dataclass
class Scenario:
    name: str
    dsn: str
    cluster: Cluster
    enqueuer: Enqueuer
    conn: psycopg.Connection[Any]
    timeline: Timeline

    def finish(self, **options: Any) -> Report:
        """Save the acknowledgements, read everything back and check it; print the counts."""
        self.enqueuer.save()
        report = check(load(self.conn), faults=self.timeline.faults, restarts=self.timeline.restarts, **options)
        summary = {
            "scenario": self.name,
            "full": FULL,
            "faults": len(self.timeline.faults),
            **report.summary(),
            "process_exits": len(self.cluster.exits),
        }
        print(json.dumps(summary, default=str))
        if os.environ.get("PGSCHED_CHAOS_REPORT"):
            with open(os.environ["PGSCHED_CHAOS_REPORT"], "a") as out:
                out.write(json.dumps(summary, default=str) + "\n")
        return report

    def clean_rate(self, seconds: float) -> float:
        """Completions per second over ``seconds`` of fault-free work (the baseline of recovery times)."""
        query = "SELECT count(*) FROM chaos.history WHERE event = 'end'"
        before = self.conn.execute(query).fetchone()
        time.sleep(seconds)  # the measuring period
        after = self.conn.execute(query).fetchone()
        assert before is not None and after is not None
        return (after[0] - before[0]) / seconds

    def reconnect(self) -> None:
        """A new harness connection (after the server restarted)."""
        self.conn.close()
        self.conn = harness_connection(self.dsn)


@contextlib.contextmanager
def running(name: str, dsn: str, env: dict[str, str], directory: Path) -> Iterator[Scenario]:
    create_schema(dsn)
    cluster = Cluster(dsn, directory, env, Settings())
    enqueuer = Enqueuer(dsn)
    conn = harness_connection(dsn)
    s = Scenario(name, dsn, cluster, enqueuer, conn, Timeline())
    try:
        yield s
        cluster.kill()  # everything they wrote is in their files
        s.reconnect()  # a scenario may have crashed the server since
        assert leaked_secrets(cluster, s.conn) == []
    finally:
        cluster.kill()
        s.enqueuer.close()  # a scenario may have replaced it
        s.conn.close()


def queued(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pgsched.jobs WHERE state = 'queued'").fetchone()
    return int(row[0]) if row else 0


def top_up(s: Scenario, rate: float, seconds: float) -> None:
    """Keep ``seconds`` of work at the clean rate queued (one enqueue of 1,000 jobs at most per call,
    which may fail under the faults), so that the rate after a fault is bound by the workers and not
    by the supply: without it the backlog ran dry halfway through the full kill storm, and every
    later fault "did not recover" to a rate the trickle alone cannot reach."""
    if queued(s.conn) < rate * seconds:
        s.enqueuer.many(1000, ms=100)


def assert_recovered(report: Report, faults: int, within: float) -> None:
    """Throughput back to 0.9 of the clean rate (a one-second window of completions, see
    ``recovery_times``) within ``within`` seconds of each of the first ``faults`` faults: every one
    at full size; at quick size, which ``make test`` runs beside the rest of the suite on a loaded
    machine, at least half of them (docs/reliability.md). The clean rate is the one of the second
    before each fault where that is lower than the one measured at the start (``recovery_local``), and where the fault was a kill the clock starts when the
    restarted worker registered (the issue's "after each restart"): on a shared machine the rate measured at the start of a
    two-minute run is not the one the machine allows later (the full kill storm's first run met a
    load average going from 6 to 13 and "recovered" after 2 of 39 kills against it)."""
    times = report.recovery_local[:faults]
    late = [i for i, t in enumerate(times) if t is None or t > within]
    allowed = 0 if FULL else len(times) // 2
    assert len(late) <= allowed, f"{len(late)} of {len(times)} faults not recovered within {within} s: {times}"


def verdicts(report: Report, conn: psycopg.Connection[Any] | None = None) -> dict[str, Any]:
    """The broken promises of a report (with the rows, runs and executions of the lost and the
    unexplained duplicated jobs, to see what happened to them)."""
    found = {name: getattr(report, name)[:20] for name in Report.VERDICTS if getattr(report, name)}
    for name in ("lost", "duplicated_unexplained"):
        if conn is None or not getattr(report, name):
            continue
        found[f"{name}_jobs"] = conn.execute(
            """SELECT j.id, j.state, j.attempts, j.worker_id, j.finished_at,
                      (SELECT array_agg(r.attempt || ':' || r.outcome ORDER BY r.id) FROM pgsched.runs r WHERE r.job_id = j.id),
                      (SELECT array_agg(h.attempt || ':' || h.event || ':' || h.pid ORDER BY h.seq) FROM chaos.history h WHERE h.job_id = j.id)
               FROM pgsched.jobs j WHERE j.id = ANY(%s) ORDER BY j.id LIMIT 10""",
            (getattr(report, name),),
        ).fetchall()
    return found
