"""The worker's view of queue controls, and the claim statements it routes its queues to.

Which of its queues are paused or controlled (``pgsched.queues``) and which of its tasks have
a ``max_per_key`` (its app's code, or the catalog): read at start, on ``pgsched_queue_settings``
and at every heartbeat. The view only routes claims; the claim statements enforce every limit,
so a stale view is never unsafe (a queue controlled since is skipped by the plain claim).
"""

from __future__ import annotations

from typing import Any

from pgsched.jobs import Job

from . import queries

# (statement, queues, tasks) of one claim
Claim = tuple[str, list[str], list[str]]


class Controls:
    def __init__(self, keyed_in_code: set[str]) -> None:
        self.keyed_in_code = keyed_in_code
        self.paused: set[str] = set()
        self.controlled: set[str] = set()
        self.keyed_tasks = set(keyed_in_code)
        self._controlled_first = False

    def update(self, rows: list[tuple[str, str, bool, bool]]) -> tuple[set[str], bool]:
        """Take the rows of ``queries.CONTROLS``; returns the queues just paused, and whether
        anything changed."""
        before = (self.paused, self.controlled, self.keyed_tasks)
        paused = {name for kind, name, is_paused, _ in rows if kind == "queue" and is_paused}
        self.controlled = {name for kind, name, _, on in rows if kind == "queue" and on}
        self.keyed_tasks = self.keyed_in_code | {name for kind, name, _, _ in rows if kind == "task"}
        newly_paused, self.paused = paused - self.paused, paused
        return newly_paused, (self.paused, self.controlled, self.keyed_tasks) != before

    def limits(self, job: Job) -> bool:
        """A cap may hold this job back: its slot frees only when its outcome is written."""
        return job.queue in self.controlled or job.task in self.keyed_tasks

    def claims(self, queues: list[str], runnable: list[str]) -> list[Claim]:
        """The plain claim for queues without controls (and tasks without max_per_key),
        claim_controlled for the rest; nothing for paused queues."""
        plain = [q for q in queues if q not in self.controlled]
        controlled = [q for q in queues if q in self.controlled and q not in self.paused]
        keyed = [t for t in runnable if t in self.keyed_tasks]
        claims: list[Claim] = [(queries.CLAIM, plain, [t for t in runnable if t not in self.keyed_tasks])]
        if keyed and plain:
            claims.append((queries.CLAIM_CONTROLLED, plain, keyed))
        if controlled:
            # Alternate which kind goes first, so that neither starves the other.
            self._controlled_first = not self._controlled_first
            claims.insert(
                0 if self._controlled_first else len(claims), (queries.CLAIM_CONTROLLED, controlled, runnable)
            )
        return [c for c in claims if c[1] and c[2]]


def claimed_row(cursor: Any) -> Any:
    """CLAIM rows: the job (JOB_COLUMNS, positionally) and its dependencies' results; CLAIM_CONTROLLED
    rows add next_claim_in, and its row without a job (id NULL) carries only that."""
    if cursor.pgresult.nfields == len(Job.__struct_fields__) + 1:
        return lambda values: (Job(*values[:-1]), values[-1], None)
    return lambda values: (None if values[0] is None else Job(*values[:-2]), values[-2], values[-1])
