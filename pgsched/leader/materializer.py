"""The materializer: turns due schedule slots into jobs.

Per pass (a leader service, see ``pgsched.leader``), for a batch of
due schedules locked with SKIP LOCKED:

- a schedule without ``next_run_at`` (new, or its timetable changed) starts
  at its first slot after now (and not before ``start_at``); nothing fires;
- the due slots are ``next_run_at`` up to now. A slot more than
  ``MISFIRE_GRACE`` old was missed (the scheduler was down or the schedule
  paused). The misfire policy decides: ``skip`` fires the latest due slot
  only if it is on time (earlier ones, and a late latest one, are dropped),
  ``run_once`` fires one run for the latest due slot however late,
  ``catch_up`` fires every due slot within ``catch_up_window`` (at most
  ``MAX_SLOTS_PER_PASS``, the most recent);
- the overlap policy looks at the schedule's live jobs from earlier passes:
  ``allow`` fires anyway, ``skip`` fires nothing while one is live,
  ``queue_one`` fires one run only if none is waiting to start (a running one
  may get one successor), ``cancel_previous`` cancels the live ones and fires
  the latest slot;
- jobs are inserted with ``ON CONFLICT (schedule_id, slot) DO NOTHING`` and
  ``next_run_at`` moves to the first slot after now by compare-and-set, so a
  slot fires at most once even when two schedulers process the same schedule.
  Jitter delays ``run_at``, never the slot;
- a schedule that cannot be evaluated (a cron or zone pgsched cannot read) is
  marked ``invalid_reason`` once, logged once, and passed over until it is
  written again.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime, timedelta
from typing import Any

import psycopg

from .. import cron, queries
from ..errors import ValidationError
from ..schedules import from_row
from .service import BATCH, Service

# The name it has always logged under, which users' logging configurations select.
log = logging.getLogger("pgsched.materializer")

MISFIRE_GRACE = timedelta(seconds=60)
MAX_SLOTS_PER_PASS = 1000


def slots_between(
    schedule: Any, first: datetime, now: datetime, created_at: datetime
) -> tuple[list[datetime], datetime]:
    """The slots from ``first`` (inclusive) up to ``now``, and the first slot after ``now``."""
    due: list[datetime] = []
    after = first - timedelta(microseconds=1)
    restarted = False
    while True:
        # Two at a time: a schedule on time has one due slot and needs the one after it.
        for slot in _next(schedule, after, created_at, 2):
            if slot > now:
                return due, slot
            due.append(slot)
            after = slot
        if len(due) >= MAX_SLOTS_PER_PASS and not restarted:
            # Too far behind to enumerate it all: keep the most recent slots (as many as
            # fit, ending now), which are the ones every misfire policy looks at.
            span = due[-1] - due[0]
            due, after, restarted = [], now - span, True


def _next(schedule: Any, after: datetime, created_at: datetime, n: int) -> list[datetime]:
    if schedule.cron is not None:
        return cron.next_fire_times(schedule.cron, schedule.timezone, after, n)
    return cron.every_slots(schedule.every, schedule.start_at or created_at, after, n)


def plan(
    schedule: Any, now: datetime, created_at: datetime, live: list[tuple[int, str]]
) -> tuple[list[datetime], datetime, list[int]]:
    """What one pass does with one schedule: (slots to fire, new next_run_at, live job ids to cancel)."""
    start = schedule.start_at
    if schedule.next_run_at is None:
        after = max(now, start - timedelta(microseconds=1)) if start else now
        return [], _next(schedule, after, created_at, 1)[0], []
    due, following = slots_between(schedule, schedule.next_run_at, now, created_at)
    if start:
        due = [s for s in due if s >= start]
    if schedule.end_at:
        due = [s for s in due if s <= schedule.end_at]
    if schedule.misfire == "skip":  # only the latest slot, and only if it is on time
        fire = due[-1:] if due and now - due[-1] <= MISFIRE_GRACE else []
    elif schedule.misfire == "run_once":
        fire = due[-1:]
    else:  # catch_up
        fire = [s for s in due if now - s <= schedule.catch_up_window]
    cancel: list[int] = []
    if fire and live and schedule.overlap != "allow":
        if schedule.overlap == "skip":
            fire = []
        elif schedule.overlap == "queue_one":
            fire = [] if any(state != "running" for _, state in live) else fire[-1:]
        else:  # cancel_previous
            cancel = [job_id for job_id, _ in live]
            fire = fire[-1:]
    return fire, following, cancel


class Materializer(Service):
    """Turns due schedule slots into jobs (see the module docstring)."""

    name = "materializer"
    interval = 0.5

    async def steps(self, conn: psycopg.AsyncConnection[Any], db_now: datetime) -> dict[str, int]:
        rows = await (await conn.execute(queries.MATERIALIZE_DUE, (BATCH,))).fetchall()
        if not rows:
            return {"fired": 0, "schedules": 0, "invalid": 0}
        schedules = [(from_row(row[:-1]), row[-1]) for row in rows]
        live: dict[int, list[tuple[int, str]]] = {}
        for schedule_id, job_id, state in await (
            await conn.execute(queries.MATERIALIZE_LIVE, ([s.id for s, _ in schedules],))
        ).fetchall():
            live.setdefault(schedule_id, []).append((job_id, state))
        fire_ids, fire_slots, fire_run_ats, cancel = [], [], [], []
        ids, seen, nexts, lasts = [], [], [], []
        invalid_ids, invalid_seen, invalid_reasons = [], [], []
        for schedule, created_at in schedules:
            try:
                fire, following, to_cancel = plan(schedule, db_now, created_at, live.get(schedule.id or 0, []))
            except ValidationError as exc:  # a bad row written by plain SQL, or a zone gone from the system
                log.warning("schedule %r cannot be evaluated; marked invalid until it is written again: %s",
                            schedule.name, exc)  # fmt: skip
                invalid_ids.append(schedule.id)
                invalid_seen.append(schedule.next_run_at)
                invalid_reasons.append(str(exc))
                continue
            for slot in fire:
                fire_ids.append(schedule.id)
                fire_slots.append(slot)
                jitter = random.uniform(0, schedule.jitter_seconds) if schedule.jitter_seconds else 0
                fire_run_ats.append(max(slot, db_now) + timedelta(seconds=jitter) if jitter else slot)
            cancel.extend(to_cancel)
            ids.append(schedule.id)
            seen.append(schedule.next_run_at)
            nexts.append(following)
            lasts.append(fire[-1] if fire else None)
        for job_id in cancel:
            await conn.execute(queries.MATERIALIZE_CANCEL, (job_id,))
        inserted = 0
        if fire_ids:
            cur = await conn.execute(queries.MATERIALIZE_INSERT_JOBS, (fire_ids, fire_slots, fire_run_ats))
            inserted = len(await cur.fetchall())
        await conn.execute(queries.MATERIALIZE_ADVANCE, (ids, seen, nexts, lasts))
        if invalid_ids:
            await conn.execute(queries.MATERIALIZE_MARK_INVALID, (invalid_ids, invalid_seen, invalid_reasons))
        return {"fired": inserted, "schedules": len(rows), "invalid": len(invalid_ids)}
