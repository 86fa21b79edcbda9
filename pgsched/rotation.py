"""Key rotation: re-encrypt live jobs (and schedule templates) with the newest key, and rewrite
version 1 envelopes (which bind no task and queue) as version 2.

``pgsched keys rotate`` calls ``rotate``. It is safe while workers run:

- each batch is its own short transaction that locks its rows ``FOR UPDATE SKIP
  LOCKED``, so it never waits on a worker, and a row a worker is completing right
  now is skipped (the next run of the command takes it);
- it writes back only re-encryptions of the values it read under that lock. A
  worker's completion either committed before the lock (then its result is what
  was read and re-encrypted, or the job is finished and not selected) or waits
  for this commit and then writes its own values: a result a worker wrote is
  never overwritten;
- a running job's worker already holds its args decrypted, so re-encrypting them
  under it changes nothing for that attempt.

Finished jobs and run logs are history and keep their key: keep an old key in
``PGSCHED_ENCRYPTION_KEYS`` (after the new one) as long as that history is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from . import queries
from .crypto import Keyring, Scope
from .errors import MissingKeyError

JOB_FIELDS = ("args", "progress", "result", "error")


@dataclass
class Rotation:
    """What a rotation did."""

    kid: str
    jobs: int = 0
    schedules: int = 0
    # Key ids named by envelopes this keyring cannot open (those rows are left as they are).
    missing: dict[str, int] = field(default_factory=dict)


def _reencrypted(keyring: Keyring, values: dict[str, Any], scope: Scope, rotation: Rotation) -> dict[str, Any] | None:
    try:
        return {name: keyring.reencrypt(value, name, scope) for name, value in values.items()}
    except MissingKeyError as exc:
        rotation.missing[exc.kid] = rotation.missing.get(exc.kid, 0) + 1
        return None


def rotate(conn: psycopg.Connection[Any], keyring: Keyring, batch: int = 100) -> Rotation:
    """Re-encrypt, batch by batch, what live jobs and schedules hold under an older key."""
    rotation = Rotation(keyring.current)
    rotation.jobs = _rotate_rows(
        conn, keyring, batch, rotation, queries.ROTATE_STALE_JOBS, queries.ROTATE_UPDATE_JOB, JOB_FIELDS
    )
    rotation.schedules = _rotate_rows(
        conn, keyring, batch, rotation, queries.ROTATE_STALE_SCHEDULES, queries.ROTATE_UPDATE_SCHEDULE, ("args",)
    )
    return rotation


def _rotate_rows(
    conn: psycopg.Connection[Any],
    keyring: Keyring,
    batch: int,
    rotation: Rotation,
    select: str,
    update: str,
    fields: tuple[str, ...],
) -> int:
    """One table: batches of ``select`` (id, task, queue, then ``fields``), each written back by ``update``."""
    count = after = 0
    while True:
        with conn.transaction():
            rows = conn.execute(select, {"after": after, "kid": keyring.current, "limit": batch}).fetchall()
            for row_id, task, queue, *values in rows:
                new = _reencrypted(keyring, dict(zip(fields, values, strict=True)), (task, queue), rotation)
                if new is not None:
                    params = {k: v if k == "error" or v is None else Jsonb(v) for k, v in new.items()}
                    conn.execute(update, {"id": row_id, **params})
                    count += 1
        if len(rows) < batch:
            return count
        after = rows[-1][0]
