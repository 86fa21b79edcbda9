"""``python -m bench [WORKLOAD ...] [--runs N] [--profile]``: measure, then print a Markdown table."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys

from . import api, api_data, ceiling, enqueue, env, events, report, scheduling, steady, worker

# In this order: W3 runs after W1c, to claim at the batch sizes W1c used.
WORKLOADS = {
    **enqueue.WORKLOADS,
    **worker.WORKLOADS,
    **ceiling.WORKLOADS,
    **scheduling.WORKLOADS,
    **steady.WORKLOADS,
    **api.WORKLOADS,
    **events.WORKLOADS,
    **api_data.WORKLOADS,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Measure pgsched on the workloads of BENCH.md; print a Markdown table."
    )
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"default: all ({', '.join(WORKLOADS)})")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per workload (median printed; default 3)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the pgsched side of every run and print the top functions (figures are then slower); "
        "W1c adds profiled worker runs (cProfile, and py-spy when installed) that do not count, and every "
        "workload's server gets pg_stat_statements",
    )
    args = parser.parse_args(argv)
    by_name = {name.lower(): name for name in WORKLOADS}
    unknown = [w for w in args.workloads if w.lower() not in by_name]
    if unknown or args.runs < 1:
        parser.error(f"unknown workload {unknown[0]}" if unknown else "--runs must be at least 1")
    wanted = {by_name[w.lower()] for w in args.workloads}
    selected = [name for name in WORKLOADS if name in wanted] or list(WORKLOADS)
    if args.profile:
        report.profiler = cProfile.Profile()

    load_before = env.load_average()
    rows: list[report.Row] = []
    servers: list[env.Server] = []
    loads: list[str] = []
    for name in selected:
        loads.append(f"{name} {env.load_average()}")
        print(f"{name}: {args.runs} run(s) ... (load {env.load_average()})", file=sys.stderr, flush=True)
        with env.fresh_database(statements=args.profile) as server:
            rows += WORKLOADS[name](server.dsn, args.runs)
        servers.append(server)
    load_after = env.load_average()
    rows = report.link_ceilings(rows)

    print(f"## pgsched benchmark: median of {args.runs} run(s), (min–max)\n")
    print(report.table(rows))
    print("\nEnvironment:\n")
    for key, value in env.machine():
        print(f"- {key}: {value}")
    print(f"- load average (1/5/15 min): before {load_before}, after {load_after}")
    print(f"- load average at the start of each workload: {'; '.join(loads)}")
    print("- figures are noisy: 2 cores shared by worker, server and whatever else runs on the machine")
    if worker.WORKER_PGOPTIONS:
        print(
            f"- EXPERIMENT: the worker processes ran with PGOPTIONS={worker.WORKER_PGOPTIONS!r}"
            " (BENCH_WORKER_PGOPTIONS)"
        )
    server = servers[0]
    print(f"- server: {server.where}")
    print(f"- PostgreSQL: {server.version}")
    print(f"- durability: {server.durability}")
    settings = ", ".join(f"{name}={value}" for name, value in server.settings)
    print(f"- non-default settings: {settings}")
    for other in servers[1:]:
        if (other.version, other.settings) != (server.version, server.settings):
            print(f"- differed for a later workload: {other.version}; {other.settings}")
    for title, body in report.sections:
        print(f"\n### {title}\n\n{body}")
    if report.profiler is not None and report.profiler.getstats():
        out = io.StringIO()
        stats = pstats.Stats(report.profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(20)
        print("\nProfile of the pgsched side (all workloads, all runs):\n\n```\n" + out.getvalue() + "```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
