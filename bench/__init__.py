"""Benchmarks of pgsched (``python -m bench``): the workloads of BENCH.md.

They print figures beside the raw-SQL ceiling measured in the same run; they
never pass or fail on time. One module per workload group (``enqueue`` for
W1a/W1b); ``env`` gives each workload a fresh server and describes the
machine; ``report`` holds the result rows and the printed table.
"""
