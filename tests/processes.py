"""``pgsched`` subprocesses for the process-tier tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


class PgschedProcess:
    """A ``pgsched ARGS`` subprocess in its own session (so a test can signal its whole process group,
    as a terminal or systemd would), its output in files."""

    def __init__(self, args: list[str], env: dict[str, str], directory: Path) -> None:
        self.args = args
        self.out = directory / "stdout"
        self.err = directory / "stderr"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pgsched", *args],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.pid = self.process.pid

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """The exit status; fails the test if the process is still running after ``timeout`` seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.args[0]} {self.pid} still running after {timeout} s; stderr:\n{self.stderr()[-3000:]}"
            ) from None

    def kill(self) -> None:
        """kill -9, and reap it."""
        self.signal(signal.SIGKILL)
        assert self.process.wait(10) == -signal.SIGKILL

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM; the exit status (fails the test if it does not exit in time)."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def check_alive(self) -> None:
        code = self.process.poll()
        assert code is None, f"{self.args[0]} {self.pid} exited with {code}; stderr:\n{self.stderr()[-3000:]}"


class WorkerProcess(PgschedProcess):
    """A ``pgsched worker ARGS`` subprocess."""

    def __init__(self, args: list[str], env: dict[str, str], directory: Path) -> None:
        super().__init__(["worker", *args], env, directory)

    def children(self) -> list[int]:
        return children(self.pid)

    def kill_all(self) -> None:
        """SIGKILL the process, its process group and its children (a supervisor's are in groups of their own)."""
        leftovers = self.children()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)


def children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found
