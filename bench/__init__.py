"""Benchmarks of pgsched (``python -m bench``): the workloads of BENCH.md.

They print figures beside the raw-SQL ceiling measured in the same run; they
never pass or fail on time. One module per workload group (``enqueue`` for
W1a/W1b, ``worker`` for W1c/W2, ``ceiling`` for W3's pgbench); ``apps`` is
the app the benchmark's worker processes load; ``env`` gives each workload a
fresh server and describes the machine and the server's CPU; ``report`` holds
the result rows and the printed table.
"""
