"""Keeping a worker's secrets (its DSN, the encryption keys) from the commands its jobs run.

A shell job is a child of the worker and runs as the same user: it can read
``/proc/$PPID/environ`` and ``/proc/$PPID/cmdline``. Two things stop it:

- the process is made non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): another
  process of the same user can then neither read those files nor attach to it;
- root (``CAP_SYS_PTRACE``) still can, and ``/proc/PID/environ`` shows the
  environment block the process started with, whatever ``os.environ`` says
  later. So the values of the secret variables (and of ``--dsn`` /
  ``--encryption-keys`` on the command line) are overwritten in place, in that
  block. ``os.environ`` and ``getenv`` keep them (on the heap, readable only
  with ptrace rights): the settings, libpq (``PGPASSWORD``) and the user's
  code (``DATABASE_URL``) go on working.

Linux only; elsewhere nothing is done. See docs/architecture.md, "Secrets of the
worker process".
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("pgsched.protect")

# Variables that hold credentials or keys. PGPASSWORD is libpq's; DATABASE_URL is the DSN's fallback.
SECRET_VARIABLES = frozenset({"PGSCHED_DSN", "DATABASE_URL", "PGSCHED_ENCRYPTION_KEYS", "PGPASSWORD"})
SECRET_FLAGS = frozenset({"--dsn", "--encryption-keys"})
PR_SET_DUMPABLE = 4
# Fields of /proc/PID/stat (proc(5), numbered from 1): where the argument and environment blocks are.
_ARG_START, _ARG_END, _ENV_START, _ENV_END = 48, 49, 50, 51


def protect_process() -> None:
    """Blank the secrets in this process's original environment and argument blocks, and make
    it non-dumpable. Call it early: before then, a job of a worker could read them."""
    if not sys.platform.startswith("linux"):
        return
    try:
        scrub_blocks()
    except (OSError, ValueError, IndexError) as exc:  # no /proc, or a kernel without these fields
        log.warning("could not blank the secrets of /proc/%d/environ: %s", os.getpid(), exc)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(ctypes.get_errno()))


def scrub_blocks() -> list[str]:
    """Overwrite with NUL bytes the values of secret variables and flags where ``/proc/self/environ``
    and ``/proc/self/cmdline`` read them; returns the names blanked."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    field = {n: int(fields[n - 3]) for n in (_ARG_START, _ARG_END, _ENV_START, _ENV_END)}  # fields[0] is field 3
    blanked: list[str] = []
    start = field[_ENV_START]
    offset = 0
    for entry in ctypes.string_at(start, field[_ENV_END] - start).split(b"\0"):
        name, sep, value = entry.partition(b"=")
        text = name.decode(errors="replace")
        if sep and value and text in SECRET_VARIABLES:
            ctypes.memset(start + offset + len(name) + 1, 0, len(value))
            blanked.append(text)
            if text in os.environ:
                # libc's environ pointed at the blanked bytes: give getenv (libpq) a copy of its own.
                os.environ[text] = os.environ[text]
        offset += len(entry) + 1
    start = field[_ARG_START]
    offset = 0
    previous = ""
    for entry in ctypes.string_at(start, field[_ARG_END] - start).split(b"\0"):
        flag, sep, _ = entry.partition(b"=")
        if previous in SECRET_FLAGS:  # --dsn VALUE
            ctypes.memset(start + offset, 0, len(entry))
            blanked.append(previous)
        elif sep and flag.decode(errors="replace") in SECRET_FLAGS:  # --dsn=VALUE
            ctypes.memset(start + offset + len(flag) + 1, 0, len(entry) - len(flag) - 1)
            blanked.append(flag.decode(errors="replace"))
        previous = entry.decode(errors="replace")
        offset += len(entry) + 1
    return blanked


@contextlib.contextmanager
def without_secrets() -> Iterator[None]:
    """The secret variables left out of ``os.environ`` for a while: for processes started then that
    have no use for them (the embedded PostgreSQL, which runs as another user)."""
    saved = {name: os.environ.pop(name) for name in SECRET_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
