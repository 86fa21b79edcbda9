"""The offline history checker: a pure function from what the database holds after a scenario
(the history the tasks wrote, the enqueuers' acknowledgements, ``pgsched.jobs``, ``pgsched.runs``)
to a report of every broken promise of DESIGN §4.

Verdicts:

- ``lost``: acknowledged jobs that are missing, not finished, or succeeded without any execution
  having ended;
- ``unexpected``: executions of jobs nobody enqueued (or whose enqueue was rolled back); a
  schedule's jobs are the scheduler's and are checked by their slots;
- ``enqueued_twice``: keys of recorded enqueues (one per call) found on more than one job: an
  unknown-outcome enqueue may have committed, but at most once;
- ``duplicated_explained`` / ``duplicated_unexplained``: every execution of a job after its first.
  It is explained when a ``lease_expired`` runs row of an attempt since the previous execution
  finished before it started (the lease ran out: at-least-once allows it); a retry after a failed
  attempt is not a duplicate at all (``retries``);
- ``rerun_after_finish``: executions of an attempt after one that succeeded, or started after the
  job's finish was written;
- ``fenced_accepted``: outcomes the database accepted from an attempt it had already taken back
  (an attempt with both a ``lease_expired`` row and an outcome row, or a result whose execution
  is not of the job's last attempt);
- ``slots_duplicated`` / ``slots_missing``: schedule slots fired twice, or expected and not fired;
- ``cap_exceeded`` / ``rate_exceeded``: peaks per queue from the ``runs`` intervals above the cap,
  or starts in a rate window above the limit;
- figures, not verdicts: ``recovery`` (seconds after each fault until completions are back to a
  share of the clean rate) and ``recovery_local`` (the same against the rate just before each fault), ``late_stop`` (how long an attempt ran on after it was rescued) and
  ``peaks`` (the most jobs of each capped queue running at once).
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

TERMINAL = ("succeeded", "failed", "cancelled")
# Outcomes after which a later attempt is a retry, not a duplicate.
RETRY_OUTCOMES = ("failed", "timeout", "interrupted", "snoozed")
# Outcomes the database accepted from an attempt (a fenced write leaves 'fenced' instead).
ACCEPTED_OUTCOMES = ("succeeded", "failed", "timeout", "cancelled", "snoozed")


class HistoryEvent(NamedTuple):
    """One row of ``chaos.history``."""

    exec: str
    job_id: int
    key: str | None
    attempt: int
    worker_id: str | None
    pid: int
    event: str  # start | end | cancelled
    at: datetime


class Ack(NamedTuple):
    """One enqueue as its caller saw it: ``ack``, ``unknown`` (exception: maybe committed) or ``rolled_back``."""

    key: str
    job_id: int | None
    outcome: str


class JobRow(NamedTuple):
    id: int
    key: str | None
    queue: str
    state: str
    attempts: int
    max_attempts: int
    result_exec: str | None
    finished_at: datetime | None
    schedule_id: int | None = None
    slot: datetime | None = None


class RunRow(NamedTuple):
    job_id: int
    attempt: int
    queue: str
    worker_id: str | None
    outcome: str
    started_at: datetime
    finished_at: datetime


@dataclass
class Observed:
    history: list[HistoryEvent]
    acks: list[Ack]
    jobs: list[JobRow]
    runs: list[RunRow]


@dataclass
class Execution:
    """One execution of a task, assembled from its history events."""

    exec: str
    job_id: int
    key: str | None
    attempt: int
    worker_id: str | None
    pid: int
    started_at: datetime
    ended_at: datetime | None = None  # None: never finished (its process died, or it is still running)
    stopped_at: datetime | None = None  # its worker cancelled it


def executions(history: Iterable[HistoryEvent]) -> list[Execution]:
    """The executions of a history, by start time."""
    found: dict[str, Execution] = {}
    for event in history:
        if event.event == "start":
            found[event.exec] = Execution(
                event.exec, event.job_id, event.key, event.attempt, event.worker_id, event.pid, event.at
            )
        elif event.exec in found:
            if event.event == "end":
                found[event.exec].ended_at = event.at
            else:
                found[event.exec].stopped_at = event.at
    return sorted(found.values(), key=lambda e: (e.started_at, e.exec))


@dataclass
class Report:
    """What the checker found; ``ok`` when no promise was broken."""

    executions: int = 0
    unknown_enqueues: int = 0
    lost: list[int] = field(default_factory=list)
    unexpected: list[int] = field(default_factory=list)
    enqueued_twice: list[str] = field(default_factory=list)
    retries: int = 0
    duplicated_explained: list[int] = field(default_factory=list)
    duplicated_unexplained: list[int] = field(default_factory=list)
    rerun_after_finish: list[int] = field(default_factory=list)
    fenced_accepted: list[int] = field(default_factory=list)
    slots_duplicated: list[tuple[int, datetime]] = field(default_factory=list)
    slots_missing: list[tuple[int, datetime]] = field(default_factory=list)
    cap_exceeded: dict[str, int] = field(default_factory=dict)
    rate_exceeded: dict[str, int] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)  # running at once, per capped queue
    recovery: list[float | None] = field(default_factory=list)
    recovery_local: list[float | None] = field(default_factory=list)  # against the rate just before
    late_stop: list[float] = field(default_factory=list)

    VERDICTS = (
        "lost",
        "unexpected",
        "enqueued_twice",
        "duplicated_unexplained",
        "rerun_after_finish",
        "fenced_accepted",
        "slots_duplicated",
        "slots_missing",
        "cap_exceeded",
        "rate_exceeded",
    )

    @property
    def ok(self) -> bool:
        return not any(getattr(self, name) for name in self.VERDICTS)

    def summary(self) -> dict[str, Any]:
        """Counts (and the figures) for a log line or a document."""
        counts: dict[str, Any] = {
            "executions": self.executions,
            "unknown_enqueues": self.unknown_enqueues,
            "retries": self.retries,
        }
        for name in (*self.VERDICTS, "duplicated_explained"):
            value = getattr(self, name)
            counts[name] = value if isinstance(value, dict) else len(value)
        counts["peaks"] = self.peaks
        counts["recovery_s"] = [None if r is None else round(r, 2) for r in self.recovery]
        counts["recovery_local_s"] = [None if r is None else round(r, 2) for r in self.recovery_local]
        counts["late_stop_max_s"] = round(max(self.late_stop), 2) if self.late_stop else None
        return counts


def check(
    observed: Observed,
    *,
    expected_slots: Mapping[int, Iterable[datetime]] | None = None,
    caps: Mapping[str, int] | None = None,
    rates: Mapping[str, tuple[int, timedelta]] | None = None,
    faults: Sequence[datetime] = (),
    restarts: Sequence[datetime] = (),
    clean_rate: float | None = None,
    recovered_share: float = 0.9,
    window: timedelta = timedelta(seconds=1),
) -> Report:
    """Check a scenario's history; see the module docstring for each verdict."""
    report = Report()
    runs_by_job: dict[int, list[RunRow]] = defaultdict(list)
    for run in observed.runs:
        runs_by_job[run.job_id].append(run)
    jobs = {job.id: job for job in observed.jobs}
    execs = executions(observed.history)
    report.executions = len(execs)
    by_job: dict[int, list[Execution]] = defaultdict(list)
    for execution in execs:
        by_job[execution.job_id].append(execution)

    acknowledged = {ack.job_id for ack in observed.acks if ack.outcome == "ack" and ack.job_id is not None}
    maybe = {ack.key for ack in observed.acks if ack.outcome in ("ack", "unknown")}
    report.unknown_enqueues = sum(ack.outcome == "unknown" for ack in observed.acks)
    for job_id in sorted(acknowledged):
        job = jobs.get(job_id)
        ended = any(e.ended_at is not None for e in by_job.get(job_id, ()))
        if job is None or job.state not in TERMINAL or (job.state == "succeeded" and not ended):
            report.lost.append(job_id)
    # A schedule's jobs are enqueued by the scheduler, which acknowledges to nobody: they are
    # checked by their slots instead.
    scheduled = {job.id for job in observed.jobs if job.schedule_id is not None}
    report.unexpected = sorted(
        {e.job_id for e in execs if e.job_id not in acknowledged | scheduled and e.key not in maybe}
    )
    keys = Counter(job.key for job in observed.jobs if job.key in maybe)
    report.enqueued_twice = sorted(key for key, n in keys.items() if n > 1)

    for job_id, job_execs in by_job.items():
        runs = runs_by_job.get(job_id, [])
        for previous, execution in itertools.pairwise(job_execs):
            if _preceded(runs, RETRY_OUTCOMES, previous, execution):
                report.retries += 1
            elif _preceded(runs, ("lease_expired",), previous, execution):
                report.duplicated_explained.append(job_id)
            else:
                report.duplicated_unexplained.append(job_id)
        if _rerun_after_finish(jobs.get(job_id), runs, job_execs):
            report.rerun_after_finish.append(job_id)
        # How long a rescued attempt's execution ran on after the rescue.
        for run in runs:
            if run.outcome == "lease_expired":
                for e in job_execs:
                    end = e.ended_at or e.stopped_at
                    if e.attempt == run.attempt and end is not None and end > run.finished_at:
                        report.late_stop.append((end - run.finished_at).total_seconds())

    report.fenced_accepted = sorted(_fenced_accepted(jobs, runs_by_job, execs))
    _slots(report, observed.jobs, expected_slots or {})
    _controls(report, observed.runs, caps or {}, rates or {})
    if faults:
        ends = sorted(e.ended_at for e in execs if e.ended_at is not None)
        report.recovery = recovery_times(ends, faults, clean_rate, recovered_share, window)
        report.recovery_local = recovery_times(
            ends, faults, clean_rate, recovered_share, window, local=True, restarts=restarts or None
        )
    return report


def _preceded(runs: list[RunRow], outcomes: tuple[str, ...], previous: Execution, execution: Execution) -> bool:
    """An attempt since ``previous`` ended with one of ``outcomes`` before ``execution`` started."""
    return any(
        r.outcome in outcomes
        and previous.attempt <= r.attempt < execution.attempt
        and r.finished_at <= execution.started_at
        for r in runs
    )


def _rerun_after_finish(job: JobRow | None, runs: list[RunRow], execs: list[Execution]) -> bool:
    """An execution of a later attempt than one that succeeded, or one that started after the job's
    finish was written (``jobs.finished_at``, the database time of that write). The ``runs`` times of
    an attempt are the worker's estimates, so they order nothing here; attempts do."""
    succeeded = min((r.attempt for r in runs if r.outcome == "succeeded"), default=None)
    if succeeded is not None and any(e.attempt > succeeded for e in execs):
        return True
    finished = job.finished_at if job is not None and job.state in TERMINAL else None
    return finished is not None and any(e.started_at > finished for e in execs)


def _fenced_accepted(
    jobs: Mapping[int, JobRow], runs_by_job: Mapping[int, list[RunRow]], execs: list[Execution]
) -> set[int]:
    found = set()
    for job_id, runs in runs_by_job.items():
        rescued = {r.attempt for r in runs if r.outcome == "lease_expired"}
        if any(r.outcome in ACCEPTED_OUTCOMES and r.attempt in rescued for r in runs):
            found.add(job_id)
    by_exec = {e.exec: e for e in execs}
    for job in jobs.values():
        if job.state == "succeeded" and job.result_exec is not None:
            execution = by_exec.get(job.result_exec)
            if execution is None or execution.attempt != job.attempts:
                found.add(job.id)
    return found


def _slots(report: Report, jobs: list[JobRow], expected: Mapping[int, Iterable[datetime]]) -> None:
    fired = Counter((job.schedule_id, job.slot) for job in jobs if job.schedule_id is not None and job.slot)
    report.slots_duplicated = sorted((s, t) for (s, t), n in fired.items() if n > 1 and s is not None and t)
    report.slots_missing = sorted((s, t) for s, times in expected.items() for t in times if (s, t) not in fired)


def _controls(
    report: Report, runs: list[RunRow], caps: Mapping[str, int], rates: Mapping[str, tuple[int, timedelta]]
) -> None:
    for queue, cap in caps.items():
        points = sorted(
            (t, delta) for r in runs if r.queue == queue for t, delta in ((r.started_at, 1), (r.finished_at, -1))
        )  # an end sorts before a start at the same instant (-1 < 1): touching intervals do not overlap
        running = peak = 0
        for _, delta in points:
            running += delta
            peak = max(peak, running)
        report.peaks[queue] = peak
        if peak > cap:
            report.cap_exceeded[queue] = peak
    for queue, (limit, period) in rates.items():
        starts = sorted(r.started_at for r in runs if r.queue == queue)
        worst = max((bisect.bisect_left(starts, t + period) - i for i, t in enumerate(starts)), default=0)
        if worst > limit:
            report.rate_exceeded[queue] = worst


def recovery_times(
    completions: Sequence[datetime],
    faults: Sequence[datetime],
    clean_rate: float | None,
    share: float = 0.9,
    window: timedelta = timedelta(seconds=1),
    *,
    local: bool = False,
    restarts: Sequence[datetime] | None = None,
) -> list[float | None]:
    """Seconds from each fault until a ``window`` of completions reaches ``share`` of the clean rate
    (None when it did not before the next fault, or the end). Without ``clean_rate``, the rate
    before the first fault is the clean one; with ``local``, each fault's clean rate is the rate of
    the ``window`` just before it when that is lower than ``clean_rate`` (on a machine shared with
    other work, the rate the machine allowed at that moment, where one measured at the start of a
    long run may no longer be; a catch-up burst after the previous fault never raises the bar). With
    ``restarts`` (one per fault), the clock of each starts when its restarted process was back."""
    completions = sorted(completions)
    if not completions or not faults:
        return [None] * len(faults)
    if local:
        starts = list(restarts or faults)
        return [
            recovery_times(completions, starts[i:], _lower(clean_rate, completions, fault, window), share, window)[0]
            for i, fault in enumerate(faults)
        ]
    if clean_rate is None:
        before = bisect.bisect_left(completions, faults[0])
        span = (faults[0] - completions[0]).total_seconds()
        clean_rate = before / span if span > 0 else 0.0
    needed = share * clean_rate * window.total_seconds()
    found: list[float | None] = []
    for i, fault in enumerate(faults):
        limit = faults[i + 1] if i + 1 < len(faults) else completions[-1]
        result = None
        for j in range(bisect.bisect_left(completions, fault), len(completions)):
            start = completions[j]
            if start + window > limit:
                break
            if bisect.bisect_left(completions, start + window) - j >= needed:
                result = (start - fault).total_seconds()
                break
        found.append(result)
    return found


def _lower(clean_rate: float | None, completions: Sequence[datetime], fault: datetime, window: timedelta) -> float:
    """The rate of the ``window`` before ``fault``, or ``clean_rate`` when that is lower."""
    count = bisect.bisect_left(completions, fault) - bisect.bisect_left(completions, fault - window)
    rate = count / window.total_seconds()
    return rate if clean_rate is None else min(rate, clean_rate)
