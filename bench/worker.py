"""W1c (drain) and W2 (latency): a real ``pgsched worker`` subprocess.

W1c: 20,000 queued no-op jobs (``app.enqueue_many`` before timing), then one
``python -m pgsched worker --app bench.apps:app --burst --concurrency 10
[--prefetch N] --poll-seconds 0.05``. Timed from just before the process is
started until it exits (start-up and shut-down included, nothing subtracted);
then SQL checks that every job is ``succeeded`` and has its ``runs`` row.
Also printed: first claim to last finish (``min(runs.started_at)`` to
``max(runs.finished_at)``), worker CPU per job (the child's rusage from
``os.wait4``, start-up included), server CPU per job (the postmaster's process
tree, before and after), process start to the first claim and last finish to
exit, and the claim batch actually used (claims are counted as distinct
``jobs.started_at`` values: one claim statement, one transaction time). A
burst worker on an empty queue gives the fixed cost of a worker process.

Rows: the defaults (concurrency 10, prefetch 0, log level INFO: one line
per finished job), and the best of prefetch 100 / 500 / 1000 at log level
WARNING (the tuning a throughput-minded operator does: the line per job costs
about a quarter of the worker's CPU on no-ops), measured in rotating order in
every run; the sync ``def`` no-op at the best prefetch. Queue controls, at the defaults: the queue with a
global cap (``max_running`` 1000, which never binds here) and with per-key caps
(``max_per_key`` 1000, the jobs spread over 100 concurrency keys), so that
the claim goes through ``pgsched.claim_controlled``; their ceiling column is
the uncapped defaults of the same runs (target: ≥ 0.7 ×).

W2: an idle worker (concurrency 10, default settings); 5 warm-up jobs, then
200 jobs enqueued one every 20 ms with ``app.enqueue``; latency is from
``time.time()`` just before each enqueue call to the ``time.time()`` that the
task's first line returns (same host, same clock). A section splits it at
``jobs.created_at`` and ``jobs.started_at`` (the enqueue's and the claim's
transaction times).

``--profile`` adds, for W1c, runs that do not count: one with
pg_stat_statements reset first, one under cProfile (``bench.profiled_worker``)
and one under py-spy when it is installed in the venv. ``BENCH_WORKER_PGOPTIONS``
(an experiment, printed when set) passes libpq options to the worker processes
only, e.g. ``-c synchronous_commit=off``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

import pgsched

from . import apps, env, report
from .report import Row, Stats

DRAIN_JOBS = 20_000
CONCURRENCY = 10
POLL_SECONDS = 0.05
DEFAULT_PREFETCH = 0
TUNED_PREFETCHES = (100, 500, 1000)
LATENCY_JOBS = 200
LATENCY_WARMUP = 5
LATENCY_INTERVAL = 0.020

ROOT = Path(__file__).resolve().parent.parent

# What W1c measured, for W3 (run after it in the same invocation) to claim at the same batch sizes.
measured_batches: dict[str, int] = {}


def settings_batch(prefetch: int, concurrency: int = CONCURRENCY) -> tuple[int, int]:
    """The claim sizes a worker's settings give: up to concurrency + prefetch, and (while the
    queue has more) at least a quarter of that (``worker/runtime.py``, ``_claim_loop``)."""
    capacity = concurrency + prefetch
    return max(1, capacity // 4), capacity


def worker_command(
    *, burst: bool, prefetch: int | None = None, poll: float | None = None, quiet: bool = False
) -> list[str]:
    cmd = [sys.executable, "-m", "pgsched", "worker", "--app", "bench.apps:app", "--concurrency", str(CONCURRENCY)]
    if burst:
        cmd.append("--burst")
    if quiet:  # tuned: no INFO line per finished job (about a quarter of the worker's CPU for no-ops)
        cmd += ["--log-level", "warning"]
    if prefetch is not None:
        cmd += ["--prefetch", str(prefetch)]
    if poll is not None:
        cmd += ["--poll-seconds", str(poll)]
    return cmd


# An experiment knob, not a setting of pgsched: libpq options for the worker processes only
# (e.g. "-c synchronous_commit=off", to see what waiting for the claim's commit costs).
WORKER_PGOPTIONS = os.environ.get("BENCH_WORKER_PGOPTIONS", "")


def worker_env(dsn: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PGSCHED_")}
    environ["PGSCHED_DSN"] = dsn
    if WORKER_PGOPTIONS:
        environ["PGOPTIONS"] = (environ.get("PGOPTIONS", "") + " " + WORKER_PGOPTIONS).strip()
    environ["PYTHONPATH"] = str(ROOT) + os.pathsep + environ.get("PYTHONPATH", "")
    return environ


@dataclass(frozen=True)
class Drain:
    """One W1c run."""

    seconds: float  # process start to exit
    active_seconds: float  # first claim to last finish
    worker_cpu: float  # seconds
    server_cpu: float | None  # seconds
    claims: int
    startup: float  # seconds from process start to the first claim (jobs.started_at: the claim's transaction time)
    tail: float  # seconds from the last finish (runs.finished_at) to the process's exit

    @property
    def jobs_per_second(self) -> float:
        return DRAIN_JOBS / self.seconds

    @property
    def batch(self) -> float:
        return DRAIN_JOBS / self.claims


def reset(conn: psycopg.Connection) -> None:
    conn.execute("TRUNCATE pgsched.jobs, pgsched.runs, pgsched.run_logs, pgsched.queues, pgsched.queue_starts CASCADE")
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")


@dataclass(frozen=True)
class Process:
    """One worker process, timed."""

    wall_start: float  # time.time() just before it was started
    seconds: float  # start to exit
    cpu: float  # its CPU seconds (user + system, from os.wait4)
    server_cpu: float | None  # the server's CPU seconds meanwhile (None: not on this machine)


def time_worker(conn: psycopg.Connection, dsn: str, cmd: list[str]) -> Process:
    """Start ``cmd`` (a burst worker), wait for it to exit; its CPU and the server's."""
    master = env.postmaster(conn)
    with tempfile.TemporaryFile() as log:
        server_before = env.server_cpu_seconds(master) if master else None
        wall_start = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=worker_env(dsn), cwd=ROOT, stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        # The worker's backends exit just after it: let the postmaster reap them.
        time.sleep(0.05)
        server_after = env.server_cpu_seconds(master) if master else None
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"worker exited with {proc.returncode}: {log.read().decode(errors='replace')[-3000:]}")
    server = None if server_before is None or server_after is None else server_after - server_before
    return Process(wall_start, seconds, usage.ru_utime + usage.ru_stime, server)


# Queue controls that route the claim through pgsched.claim_controlled without binding.
CONTROLS = {"cap": {"max_running": 1000}, "keys": {"max_per_key": 1000}}
KEYS = 100


def drain_once(
    app: pgsched.App,
    conn: psycopg.Connection,
    *,
    task: str,
    prefetch: int,
    wrap: list[str] | None = None,
    controls: str | None = None,
) -> Drain:
    """Queue 20,000 jobs of ``task``, then time one burst worker draining them."""
    reset(conn)
    key = (lambda i: f"k{i % KEYS}") if controls == "keys" else (lambda i: None)
    app.enqueue_many([pgsched.JobSpec(task=task, args={"i": i}, concurrency_key=key(i)) for i in range(DRAIN_JOBS)])
    if controls:
        app.configure_queue("default", create=True, **CONTROLS[controls])
    conn.execute("VACUUM ANALYZE pgsched.jobs")
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute("CHECKPOINT")
    # The tuned runs (a prefetch) also log at WARNING; the defaults keep the INFO line per job.
    cmd = worker_command(burst=True, prefetch=prefetch or None, poll=POLL_SECONDS, quiet=prefetch > 0)
    if wrap:
        # A wrapper that is itself Python (bench.profiled_worker) takes pgsched's arguments.
        cmd = wrap + (cmd[3:] if wrap[0] == sys.executable else cmd)
    proc = time_worker(conn, app.settings.dsn or "", cmd)
    (done, active, claims, first_claim, last_finish) = conn.execute(  # type: ignore[misc]
        """
        SELECT (SELECT count(*) FROM pgsched.jobs j
                WHERE j.state = 'succeeded'
                  AND EXISTS (SELECT 1 FROM pgsched.runs r
                              WHERE r.job_id = j.id AND r.attempt = j.attempts AND r.outcome = 'succeeded')),
               (SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM pgsched.runs),
               (SELECT count(DISTINCT started_at) FROM pgsched.jobs),
               (SELECT extract(epoch FROM min(started_at)) FROM pgsched.jobs),
               (SELECT extract(epoch FROM max(finished_at)) FROM pgsched.runs)
        """
    ).fetchone()
    assert done == DRAIN_JOBS, f"only {done} of {DRAIN_JOBS} jobs succeeded with their runs row"
    startup = float(first_claim) - proc.wall_start
    tail = proc.wall_start + proc.seconds - float(last_finish)
    return Drain(proc.seconds, float(active), proc.cpu, proc.server_cpu, int(claims), startup, tail)


def empty_once(app: pgsched.App, conn: psycopg.Connection) -> Process:
    """A burst worker on an empty queue: the fixed cost of a worker process (start, one claim, exit)."""
    reset(conn)
    return time_worker(conn, app.settings.dsn or "", worker_command(burst=True, poll=POLL_SECONDS))


def _median(values: list[float]) -> float:
    return statistics.median(values)


TARGET = "> 32,000 jobs/s and ≥ 0.8 × W3 at the same batch"


def _drain_rows(name: str, what: str, runs: list[Drain], target: str, prefetch: int) -> list[Row]:
    """The main row (jobs/s, linked to W3 at its batch), then its details, labelled ``name``."""
    lo, hi = settings_batch(prefetch)

    def per_job(values: list[float]) -> Stats:
        return Stats([1000 * v / DRAIN_JOBS for v in values])

    rows = [
        Row(
            "W1c",
            what,
            Stats([r.jobs_per_second for r in runs]),
            "jobs/s",
            target,
            batch=round(_median([r.batch for r in runs])),
        ),
        Row(
            "W1c",
            f"{name}: first claim → last finish",
            Stats([DRAIN_JOBS / r.active_seconds for r in runs]),
            "jobs/s",
            "–",
        ),
        Row("W1c", f"{name}: worker CPU", per_job([r.worker_cpu for r in runs]), "ms/job", "–", digits=3),
    ]
    if all(r.server_cpu is not None for r in runs):
        rows.append(
            Row("W1c", f"{name}: server CPU", per_job([r.server_cpu or 0 for r in runs]), "ms/job", "–", digits=3)
        )
    rows.append(Row("W1c", f"{name}: process start → first claim", Stats([1000 * r.startup for r in runs]), "ms", "–"))
    rows.append(Row("W1c", f"{name}: last finish → process exit", Stats([1000 * r.tail for r in runs]), "ms", "–"))
    batch = f"{name}: jobs per claim (settings: {lo}–{hi})"
    rows.append(Row("W1c", batch, Stats([r.batch for r in runs]), "jobs", "–", digits=1))
    return rows


def w1c(dsn: str, runs: int) -> list[Row]:
    app = apps.build(dsn).open()
    configs = [DEFAULT_PREFETCH, *TUNED_PREFETCHES]
    results: dict[int, list[Drain]] = {p: [] for p in configs}
    with app, psycopg.connect(dsn, autocommit=True) as conn:
        for run in range(runs):
            order = configs[run % len(configs) :] + configs[: run % len(configs)]
            for prefetch in order:
                drain = drain_once(app, conn, task="noop", prefetch=prefetch)
                results[prefetch].append(drain)
                print(
                    f"  W1c run {run + 1} prefetch {prefetch}: {drain.jobs_per_second:,.0f} jobs/s,"
                    f" {drain.batch:.0f} jobs/claim, load {env.load_average()}",
                    file=sys.stderr,
                    flush=True,
                )
        controlled: dict[str, list[Drain]] = {name: [] for name in CONTROLS}
        for run in range(runs):
            for name in CONTROLS:
                controlled[name].append(drain_once(app, conn, task="noop", prefetch=DEFAULT_PREFETCH, controls=name))
                print(
                    f"  W1c run {run + 1} {name}: {controlled[name][-1].jobs_per_second:,.0f} jobs/s", file=sys.stderr
                )
        best = max(TUNED_PREFETCHES, key=lambda p: _median([r.jobs_per_second for r in results[p]]))
        sync = []
        for run in range(runs):
            sync.append(drain_once(app, conn, task="noop_sync", prefetch=best))
            print(f"  W1c run {run + 1} sync, prefetch {best}: {sync[-1].jobs_per_second:,.0f} jobs/s", file=sys.stderr)
        empty = [empty_once(app, conn) for _ in range(runs)]
        if report.profiler is not None:
            _profile_drains(app, conn, best)
    sweep = " / ".join(f"{_median([r.jobs_per_second for r in results[p]]):,.0f}" for p in TUNED_PREFETCHES)
    tried = " / ".join(str(p) for p in TUNED_PREFETCHES)
    rows = _drain_rows(
        "defaults",
        f"drain, defaults (--concurrency {CONCURRENCY}, prefetch 0), async no-op",
        results[DEFAULT_PREFETCH],
        TARGET,
        DEFAULT_PREFETCH,
    )
    uncapped = Stats([r.jobs_per_second for r in results[DEFAULT_PREFETCH]])
    for name, what in (("cap", "max_running 1000"), ("keys", f"max_per_key 1000, {KEYS} keys")):
        figure = Stats([r.jobs_per_second for r in controlled[name]])
        what = f"drain, defaults, queue controls: {what} (ceiling: uncapped defaults)"
        rows.append(Row("W1c", what, figure, "jobs/s", "≥ 0.7 × uncapped", ceiling=uncapped))
    rows += _drain_rows(
        "tuned",
        f"drain, tuned: --prefetch {best} --log-level warning (prefetch {tried}: {sweep} jobs/s), async no-op",
        results[best],
        TARGET,
        best,
    )
    rows += _drain_rows(
        "tuned sync", f"drain, tuned (--prefetch {best} --log-level warning), sync def no-op", sync, "–", best
    )
    rows.append(
        Row("W1c", "empty queue: burst worker, start → exit", Stats([1000 * e.seconds for e in empty]), "ms", "–")
    )
    rows.append(Row("W1c", "empty queue: burst worker CPU", Stats([1000 * e.cpu for e in empty]), "ms", "–"))
    measured_batches["defaults"] = round(_median([r.batch for r in results[DEFAULT_PREFETCH]]))
    measured_batches["tuned"] = round(_median([r.batch for r in results[best]]))
    return rows


# -- profiling (``--profile``): extra runs, not counted in the figures --------------------------


def _profile_drains(app: pgsched.App, conn: psycopg.Connection, best: int) -> None:
    for label, prefetch in (("defaults", DEFAULT_PREFETCH), (f"prefetch {best}", best)):
        if env.statements_enabled:
            conn.execute("SELECT pg_stat_statements_reset()")
            drain = drain_once(app, conn, task="noop", prefetch=prefetch)
            body = (
                f"An unprofiled run: {drain.jobs_per_second:,.0f} jobs/s, {drain.claims} claims "
                f"({drain.batch:.1f} jobs/claim). Server execution time only (not parse, network, commit wait).\n\n"
            )
            report.sections.append((f"W1c {label}: pg_stat_statements", body + env.statements_table(conn, DRAIN_JOBS)))
        with tempfile.TemporaryDirectory(prefix="pgsb-prof-") as tmp:
            prof = str(Path(tmp) / "worker.prof")
            wrap = [sys.executable, "-m", "bench.profiled_worker", prof]
            drain = drain_once(app, conn, task="noop", prefetch=prefetch, wrap=wrap)
            title = f"W1c {label}: cProfile of the worker process ({drain.jobs_per_second:,.0f} jobs/s under cProfile)"
            report.sections.append((title, _pstats_text(prof)))
            spy = _py_spy()
            if spy:
                raw = str(Path(tmp) / "py-spy.txt")
                wrap = [spy, "record", "--format", "raw", "--rate", "1000", "--nonblocking", "-o", raw, "--"]
                drain = drain_once(app, conn, task="noop", prefetch=prefetch, wrap=wrap)
                title = f"W1c {label}: py-spy samples of the worker ({drain.jobs_per_second:,.0f} jobs/s under py-spy)"
                report.sections.append((title, _collapsed(raw)))


def _pstats_text(path: str) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(path, stream=buf)
    stats.strip_dirs().sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)
    return "```\n" + buf.getvalue().strip() + "\n```"


def _py_spy() -> str | None:
    for candidate in (Path(sys.executable).parent / "py-spy",):
        if candidate.exists():
            return str(candidate)
    return None


def _collapsed(path: str, top: int = 30) -> str:
    """Self time and inclusive time per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        return f"(py-spy wrote nothing: {exc})"
    in_loop = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        if "_run_once" in stack:
            in_loop += n
        # "function (path/file.py:line)" -> "function (file.py)": a function, not a line.
        frames = [re.sub(r"\((?:.*/)?([^/:]+):\d+\)$", r"(\1)", frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    if not total:
        return "(no samples)"
    out = [
        f"{total:,} samples (1 kHz, on-CPU only: py-spy leaves idle threads out); "
        f"{100 * in_loop / total:.0f}% inside the event loop (the rest: interpreter start, imports, CLI).",
        "",
        "| self % | incl. % | function |",
        "| ---: | ---: | --- |",
    ]
    for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"| {100 * own.get(frame, 0) / total:.1f} | {100 * n / total:.1f} | `{frame}` |")
    out += ["", "Top self time:", "", "| self % | function |", "| ---: | --- |"]
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"| {100 * n / total:.1f} | `{frame}` |")
    return "\n".join(out)


# -- W2 --------------------------------------------------------------------------------------


def _wait_done(conn: psycopg.Connection, ids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        (left,) = conn.execute(  # type: ignore[misc]
            "SELECT count(*) FROM pgsched.jobs WHERE id = ANY(%s) AND state <> 'succeeded'", (ids,)
        ).fetchone()
        if left == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} of {len(ids)} jobs not succeeded after {timeout} s")
        time.sleep(0.02)


# The segments of one W2 latency, in order (they add up to the total).
SEGMENTS = {
    "call → enqueue transaction": "enqueue call start → jobs.created_at (pool, encoding, send)",
    "enqueue transaction → call returns": "jobs.created_at → enqueue returns (pgsched.enqueue, commit, reply)",
    "call returns → claim": "enqueue returns → jobs.started_at (NOTIFY, listener, claim loop, claim sent)",
    "claim → task": "jobs.started_at → task's first line (claim, commit, rows, slot)",
}


def latency_once(app: pgsched.App, conn: psycopg.Connection) -> list[tuple[float, ...]]:
    """Per job (ms): total latency, then the SEGMENTS; 200 jobs enqueued one every 20 ms to an idle
    worker with default settings. ``jobs.created_at`` and ``jobs.started_at`` are the enqueue's and
    the claim's transaction times (server clock, same host as the bench and the worker)."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            worker_command(burst=False), env=worker_env(app.settings.dsn or ""), cwd=ROOT, stdout=log, stderr=log
        )
        try:
            warm = [app.enqueue("stamp", {"i": -1 - i}).id for i in range(LATENCY_WARMUP)]
            _wait_done(conn, warm, 60)
            time.sleep(0.5)  # idle again
            sent: dict[int, tuple[float, float]] = {}
            start = time.perf_counter()
            for i in range(LATENCY_JOBS):
                delay = start + i * LATENCY_INTERVAL - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                t = time.time()
                job_id = app.enqueue("stamp", {"i": i}).id
                sent[job_id] = (t, time.time())
            _wait_done(conn, list(sent), 60)
        finally:
            env.stop_process(proc, log, "worker")
    rows = conn.execute(
        "SELECT id, result, extract(epoch FROM created_at), extract(epoch FROM started_at)"
        " FROM pgsched.jobs WHERE id = ANY(%s)",
        (list(sent),),
    ).fetchall()
    out = []
    for job_id, result, created, claimed in rows:
        before, after = sent[job_id]
        marks = [before, float(created), after, float(claimed), result["t"]]
        out.append((1000 * (marks[-1] - marks[0]), *(1000 * (b - a) for a, b in itertools.pairwise(marks))))
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def w2(dsn: str, runs: int) -> list[Row]:
    app = apps.build(dsn).open()
    figures: dict[str, list[float]] = {"p50": [], "p95": [], "p99": [], "max": []}
    segments: list[list[float]] = [[] for _ in SEGMENTS]
    with app, psycopg.connect(dsn, autocommit=True) as conn:
        for run in range(runs):
            if env.statements_enabled and run == runs - 1:
                conn.execute("SELECT pg_stat_statements_reset()")
            jobs = latency_once(app, conn)
            assert len(jobs) == LATENCY_JOBS
            lat = sorted(job[0] for job in jobs)
            for k in range(len(SEGMENTS)):
                segments[k] += [job[1 + k] for job in jobs]
            for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100)):
                figures[name].append(percentile(lat, q))
            print(
                f"  W2 run {run + 1}: p50 {figures['p50'][-1]:.2f} p99 {figures['p99'][-1]:.2f}"
                f" max {figures['max'][-1]:.2f} ms, load {env.load_average()}",
                file=sys.stderr,
                flush=True,
            )
    lines = ["| segment | p50 ms | p95 ms | p99 ms | max ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for (name, meaning), values in zip(SEGMENTS.items(), segments, strict=True):
        values.sort()
        cells = " | ".join(f"{percentile(values, q):.2f}" for q in (50, 95, 99, 100))
        lines.append(f"| {name}: {meaning} | {cells} |")
    body = (
        f"All {runs * LATENCY_JOBS} jobs of all runs; each segment's percentiles on its own (they do not add up).\n\n"
    )
    report.sections.append(("W2: where the latency goes", body + "\n".join(lines)))
    if env.statements_enabled:
        with psycopg.connect(dsn, autocommit=True) as conn:
            table = env.statements_table(conn, LATENCY_WARMUP + LATENCY_JOBS)
        report.sections.append(("W2 (last run): pg_stat_statements", table))
    targets = {"p50": "< 1.5 ms", "p95": "–", "p99": "< 4 ms", "max": "–"}
    what = f"latency {{}}, idle worker (concurrency {CONCURRENCY}, defaults), 200 jobs 1 per 20 ms"
    return [
        Row("W2", what.format(name), Stats(values), "ms", targets[name], digits=2) for name, values in figures.items()
    ]


WORKLOADS = {"W1c": w1c, "W2": w2}
