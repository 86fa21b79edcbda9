"""Statements the API runs itself (the rest are the library's, through ``App``)."""

from __future__ import annotations

from typing import Any

from pgsched.jobs import JOB_COLUMNS

# Whose request this transaction serves: read by the row-level security policies on jobs
# (sql/0011_api.sql) and by pgsched.enqueue. Local to the transaction (true).
ACT_FOR = "SELECT set_config('pgsched.owner', %s, true), set_config('pgsched.role', %s, true)"

# Whether the API's login may serve requests: not a role that row-level security lets see every
# job (superuser, BYPASSRLS, the table's owner, or a group with an unrestricted policy), and a
# member of pgsched_api.
LOGIN_CHECK = """
SELECT current_user::text,
       r.rolsuper OR r.rolbypassrls OR pg_has_role(current_user, c.relowner, 'MEMBER')
           OR EXISTS (SELECT 1 FROM unnest(ARRAY['pgsched_worker', 'pgsched_enqueuer', 'pgsched_reader',
                                                 'pgsched_admin', 'pgsched_owner']) AS g(name)
                      WHERE pg_has_role(current_user, g.name, 'MEMBER')) AS sees_all,
       pg_has_role(current_user, 'pgsched_api', 'MEMBER') AS api_member
FROM pg_roles r, pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE r.rolname = current_user AND n.nspname = 'pgsched' AND c.relname = 'jobs'
"""

# Newest first, one page after a cursor (the last id of the previous page), no count taken: for
# an owner a backward range scan of jobs_owner_idx (sql/0014), for all owners one of the primary
# key, stopped by LIMIT. Only the filters given are in the statement: each combination is its own
# prepared statement with its own plan (a generic plan of "$1 IS NULL OR owner = $1" could not use
# the owner's index). The owner filter is the first line of isolation, row-level security the
# second.
LIST_FILTERS = {
    "owner": "owner = %(owner)s",
    "state": "state = %(state)s",
    "queue": "queue = %(queue)s",
    "task": "task = %(task)s",
    "owner_param": "owner = %(owner_param)s",
    "search": "task ILIKE '%%' || %(search)s || '%%'",
    "created_after": "created_at >= %(created_after)s",
    "created_before": "created_at < %(created_before)s",
    "finished_after": "finished_at >= %(finished_after)s",
    "finished_before": "finished_at < %(finished_before)s",
    "before": "id < %(before)s",
}


# Before a page query, in its transaction. The planner multiplies the owner filter's selectivity by
# that of the row-level security policy (which tests the owner again, through current_setting(),
# a value it cannot see): it expects a few dozen of an owner's thousands of rows, and reads them
# all through a bitmap, then sorts them, rather than walking jobs_owner_idx backwards and stopping
# at the page's end; or, deep in a large table, it walks the primary key with parallel workers,
# whose start alone costs a page more than the whole index walk (bench A3 prints the plans).
# Without bitmaps and parallel workers it walks the index (tests/test_api_data.py checks it).
WALK_THE_INDEX = """
SELECT set_config('enable_bitmapscan', 'off', true), set_config('max_parallel_workers_per_gather', '0', true)
"""


def list_jobs(params: dict[str, Any]) -> str:
    """The page query for these parameters (a None parameter is no filter)."""
    where = " AND ".join(sql for name, sql in LIST_FILTERS.items() if params[name] is not None)
    return f"SELECT {JOB_COLUMNS} FROM pgsched.jobs WHERE {where or 'true'} ORDER BY id DESC LIMIT %(limit)s"


# One job the user may see, locked for a change (primary key).
VISIBLE_JOB = "SELECT id FROM pgsched.jobs WHERE id = %s AND (%s::text IS NULL OR owner = %s) FOR NO KEY UPDATE"

# Idempotency keys: one transaction per (user, key) at a time, then the stored first response.
IDEMPOTENCY_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('pgsched.idempotency:' || %s || ':' || %s, 0))"
IDEMPOTENCY_EXPIRE = """
DELETE FROM pgsched.api_idempotency
WHERE user_id = %s AND key = %s AND created_at <= pgsched.now() - interval '24 hours'
"""
IDEMPOTENCY_GET = "SELECT request_hash, status, response FROM pgsched.api_idempotency WHERE user_id = %s AND key = %s"
IDEMPOTENCY_PUT = """
INSERT INTO pgsched.api_idempotency (user_id, key, request_hash, status, response) VALUES (%s, %s, %s, %s, %s::jsonb)
"""

# The database clock (STYLE habit 2): what "now" is for previews and next fire times.
DB_NOW = "SELECT pgsched.now()"

# Whether the user may see a job, without locking it (reads).
JOB_SEEN = "SELECT task, queue FROM pgsched.jobs WHERE id = %s AND (%s::text IS NULL OR owner = %s)"

# Bulk cancel and retry: the jobs a filter selects, in states the action applies to, one batch at
# a time (newest first, below the previous batch), locked for the change that follows.
_BULK_FILTER = """
FROM pgsched.jobs
WHERE (%(owner)s::text IS NULL OR owner = %(owner)s)
  AND state = ANY(%(states)s::text[])
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(task)s::text IS NULL OR task = %(task)s)
  AND (%(owner_param)s::text IS NULL OR owner = %(owner_param)s)
"""
BULK_COUNT = "SELECT count(*) " + _BULK_FILTER
BULK_BATCH = (
    "SELECT id "
    + _BULK_FILTER
    + "  AND (%(below)s::bigint IS NULL OR id < %(below)s) ORDER BY id DESC LIMIT %(batch)s FOR NO KEY UPDATE"
)
BULK_CANCEL = "SELECT c.id FROM unnest(%s::bigint[]) AS i(id), LATERAL pgsched.cancel(i.id, %s) AS c"
BULK_RETRY = "SELECT r.id FROM unnest(%s::bigint[]) AS i(id), LATERAL pgsched.retry(i.id) AS r"
