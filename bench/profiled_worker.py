"""``python -m bench.profiled_worker OUT.prof worker ARGS...``: ``pgsched worker`` under cProfile.

``pgsched worker`` leaves with ``os._exit`` (so an abandoned task thread cannot hold the
process), which skips ``python -m cProfile``'s dump at exit: here the dump happens first.
"""

from __future__ import annotations

import cProfile
import os
import sys


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    profile = cProfile.Profile()
    real_exit = os._exit

    def dump_then_exit(code: int) -> None:
        profile.disable()
        profile.dump_stats(out)
        real_exit(code)

    os._exit = dump_then_exit  # type: ignore[assignment]
    sys.argv = ["pgsched", *args]
    profile.enable()
    from pgsched.cli import main as pgsched_main

    try:
        pgsched_main()
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
