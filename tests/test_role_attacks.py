"""Each database role attacks what it must not touch (issue 19), and nothing changes.

For every group role (pgsched_reader, pgsched_enqueuer, pgsched_worker, pgsched_admin, pgsched_api) a fresh LOGIN
member tries, statement by statement, what an attacker holding it would: read other tenants'
payloads, write columns and tables that are not its own, create, alter or drop objects of the
schema, escalate with SET ROLE or GRANT, and call every SECURITY DEFINER function of the schema
(listed from pg_proc, so a new one cannot be missed) with hostile arguments after planting
pg_temp shadows of the types, relations, functions and operators they use. Each attempt must be
refused, and a fingerprint of the database (row counts, objects and their owners, function
bodies and settings, privileges, role memberships, triggers) must not change.
"""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg
import pytest

from .conftest import row_counts
from .test_security import Login, login, set_traps  # noqa: F401  (the fixture)

pytestmark = pytest.mark.db

GROUPS = ["pgsched_reader", "pgsched_enqueuer", "pgsched_worker", "pgsched_admin", "pgsched_api"]
DENIED = "42501"  # insufficient_privilege: also "must be owner" and a refused SET ROLE

# What no pgsched role may do, whatever its group.
EVERY_ROLE_REFUSED = [
    # objects of the schema: create, replace, alter, drop
    "CREATE TABLE pgsched.mine (x int)",
    "CREATE VIEW pgsched.mine AS SELECT 1",
    "CREATE FUNCTION pgsched.mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE OR REPLACE FUNCTION pgsched.now() RETURNS timestamptz LANGUAGE sql AS $$SELECT '2000-01-01'::timestamptz$$",
    "CREATE INDEX mine ON pgsched.jobs (args)",
    "CREATE TRIGGER mine BEFORE INSERT ON pgsched.jobs FOR EACH ROW EXECUTE FUNCTION pgsched.schedule_future_job()",
    "ALTER TABLE pgsched.jobs DISABLE TRIGGER jobs_guard_commands",
    "ALTER TABLE pgsched.jobs DISABLE TRIGGER jobs_refuse_bad_input",
    "ALTER TABLE pgsched.jobs DROP CONSTRAINT jobs_queue_format",
    "ALTER TABLE pgsched.jobs ADD COLUMN mine text",
    "ALTER TABLE pgsched.jobs OWNER TO CURRENT_USER",
    "ALTER FUNCTION pgsched.enqueue(text, jsonb, text, integer, timestamptz, integer, text, bigint[], text, interval,"
    " double precision, uuid, text, boolean) SECURITY INVOKER",
    "ALTER FUNCTION pgsched.prune_history(integer) RESET search_path",
    "ALTER FUNCTION pgsched.may_create_command_jobs(name) RENAME TO anyone",
    "DROP TABLE pgsched.audit_log",
    "DROP FUNCTION pgsched.guard_command_jobs() CASCADE",
    "DROP TRIGGER jobs_guard_commands ON pgsched.jobs",
    "ALTER SCHEMA pgsched RENAME TO mine",
    "DROP SCHEMA pgsched CASCADE",
    "COMMENT ON TABLE pgsched.jobs IS 'mine'",
    # escalation
    "SET ROLE pgsched_owner",
    "SET SESSION AUTHORIZATION postgres",
    "GRANT pgsched_owner TO CURRENT_USER",
    "ALTER ROLE CURRENT_USER SUPERUSER",
    "ALTER ROLE CURRENT_USER BYPASSRLS",
    "ALTER ROLE pgsched_owner LOGIN",
    "CREATE ROLE mine SUPERUSER",
    # the migration history the clients trust
    "UPDATE pgsched.schema_migrations SET checksum = 'mine'",
    "DELETE FROM pgsched.schema_migrations",
]

# What each group must not do on top of that (its own powers excepted).
REFUSED = {
    "pgsched_reader": [
        "SELECT args FROM pgsched.jobs",
        "SELECT count(*) FROM pgsched.jobs",
        "SELECT * FROM pgsched.runs",
        "SELECT message FROM pgsched.run_logs",
        "SELECT * FROM pgsched.users",
        "SELECT token_hash FROM pgsched.api_tokens",
        "SELECT * FROM pgsched.audit_log",
        "INSERT INTO pgsched.jobs (task) VALUES ('noop')",
        "UPDATE pgsched.queues SET paused = true",
        "SELECT pgsched.enqueue('noop')",
        "SELECT pgsched.cancel(1)",
        "SELECT pgsched.rescue(1000)",
        "SET ROLE pgsched_worker",
        "SET ROLE pgsched_enqueuer",
        "SET ROLE pgsched_admin",
    ],
    "pgsched_enqueuer": [
        # other tenants' payloads: not by reading, not by filtering on them, not by RETURNING them
        "SELECT args FROM pgsched.jobs",
        "SELECT id FROM pgsched.jobs WHERE args ->> 'card' = '4111'",
        "SELECT id FROM pgsched.jobs WHERE owner = 'team-a'",
        "SELECT id FROM pgsched.jobs ORDER BY result",
        "INSERT INTO pgsched.jobs (task) VALUES ('noop') RETURNING args",
        "SELECT * FROM pgsched.runs",
        "SELECT message FROM pgsched.run_logs",
        "SELECT * FROM pgsched.queue_stats",
        # writes that are not an enqueue
        "UPDATE pgsched.jobs SET priority = 100",
        "UPDATE pgsched.jobs SET state = 'cancelled' WHERE owner = 'team-a'",
        "DELETE FROM pgsched.jobs",
        "TRUNCATE pgsched.jobs",
        "INSERT INTO pgsched.jobs (task) VALUES ('noop') ON CONFLICT (id) DO UPDATE SET args = '{}'",
        "INSERT INTO pgsched.jobs (task, state) VALUES ('noop', 'succeeded')",
        "INSERT INTO pgsched.jobs (task, created_by) VALUES ('shell', 'postgres')",
        "INSERT INTO pgsched.jobs (task, worker_id) VALUES ('noop', gen_random_uuid())",
        "INSERT INTO pgsched.jobs (task, schedule_id, slot) VALUES ('noop', 1, now())",
        "INSERT INTO pgsched.job_deps VALUES (1, 2)",
        "INSERT INTO pgsched.jobs (task, args) VALUES ('shell', '{\"cmd\": [\"id\"]}')",
        "INSERT INTO pgsched.jobs (task, args) VALUES ('http', '{\"url\": \"http://169.254.169.254/\"}')",
        "SELECT pgsched.enqueue('shell', '{\"cmd\": [\"id\"]}')",
        "INSERT INTO pgsched.schedules (name, task, cron) VALUES ('mine', 'noop', '* * * * *')",
        "INSERT INTO pgsched.tasks (name) VALUES ('mine')",
        "UPDATE pgsched.queues SET paused = true",
        "INSERT INTO pgsched.audit_log (actor, action, target_type) VALUES ('me', 'x', 'y')",
        "SELECT * FROM pgsched.audit_log",
        "DELETE FROM pgsched.audit_log",
        "SELECT * FROM pgsched.users",
        "SELECT pgsched.cancel(1)",
        "SELECT pgsched.retry(1)",
        "SELECT pgsched.cancel_workflow(gen_random_uuid())",
        "SELECT pgsched.promote(1000)",
        "SELECT pgsched.rescue(1000)",
        "SELECT pgsched.prune_jobs(1000)",
        "SELECT pgsched.prune_history(1000)",
        "SELECT pgsched.ensure_history_partitions(7)",
        "SET ROLE pgsched_worker",
        "SET ROLE pgsched_admin",
    ],
    "pgsched_worker": [
        # what a job runs, and on whose authority, is fixed by its creator
        'UPDATE pgsched.jobs SET args = \'{"cmd": ["id"]}\'',
        "UPDATE pgsched.jobs SET task = 'shell'",
        "UPDATE pgsched.jobs SET created_by = 'postgres'",
        "UPDATE pgsched.jobs SET owner = 'team-b'",
        "UPDATE pgsched.jobs SET queue = 'elsewhere'",
        "INSERT INTO pgsched.jobs (task, args) VALUES ('shell', '{\"cmd\": [\"id\"]}')",
        "SELECT pgsched.enqueue('http', '{\"url\": \"http://169.254.169.254/\"}')",
        "INSERT INTO pgsched.schedules (name, task, args, every) VALUES ('mine', 'shell', '{\"cmd\": [\"id\"]}', '1 minute')",
        # operators' settings and accounts
        "UPDATE pgsched.queues SET max_running = NULL",
        "INSERT INTO pgsched.queues (name, paused) VALUES ('default', true)",
        "SELECT * FROM pgsched.users",
        "SELECT token_hash FROM pgsched.api_tokens",
        "UPDATE pgsched.api_tokens SET revoked_at = NULL",
        "SELECT secret_hash FROM pgsched.api_sessions",
        "SELECT nonce FROM pgsched.oidc_logins",
        "UPDATE pgsched.users SET password_hash = NULL",
        "SELECT * FROM pgsched.audit_log",
        "DELETE FROM pgsched.audit_log",
        "TRUNCATE pgsched.jobs",
        "TRUNCATE pgsched.runs",
        "SET ROLE pgsched_admin",
        "SET ROLE pgsched_enqueuer",
    ],
    "pgsched_api": [
        # the REST API's login: jobs change only by cancel and retry (row-level security decides which),
        # are created only through pgsched.enqueue, never with a command, and never change owner
        # a session or an OIDC account is never moved to another user, nor made to last longer
        "UPDATE pgsched.api_sessions SET user_id = 1",
        "UPDATE pgsched.api_sessions SET expires_at = 'infinity'",
        "UPDATE pgsched.users SET oidc_subject = 'someone else'",
        "INSERT INTO pgsched.jobs (task) VALUES ('noop')",
        "UPDATE pgsched.jobs SET owner = 'team-b'",
        'UPDATE pgsched.jobs SET args = \'{"cmd": ["id"]}\'',
        "UPDATE pgsched.jobs SET task = 'shell'",
        "UPDATE pgsched.jobs SET created_by = 'postgres'",
        "DELETE FROM pgsched.jobs",
        "TRUNCATE pgsched.jobs",
        "SELECT pgsched.enqueue('shell', '{\"cmd\": [\"id\"]}')",
        "ALTER TABLE pgsched.jobs DISABLE ROW LEVEL SECURITY",
        "DROP POLICY jobs_api_read ON pgsched.jobs",
        "CREATE POLICY mine ON pgsched.jobs TO pgsched_api USING (true)",
        # the audit log is append-only; users keep their names (their roles and permissions are the
        # API's to change, for its admins, and their passwords since issue 21's sign-in, for admins
        # and for the users themselves with the current one: api/session.py)
        "UPDATE pgsched.audit_log SET actor = 'nobody'",
        "DELETE FROM pgsched.audit_log",
        "TRUNCATE pgsched.audit_log",
        "UPDATE pgsched.users SET username = 'mallory'",
        "INSERT INTO pgsched.users (username, password_hash) VALUES ('mallory', 'x')",
        "DELETE FROM pgsched.users",
        "UPDATE pgsched.api_tokens SET user_id = 1",
        "DELETE FROM pgsched.api_tokens",
        # the engine's tables and services
        "INSERT INTO pgsched.runs (job_id, attempt, queue, task, started_at) VALUES (1, 1, 'q', 't', now())",
        "DELETE FROM pgsched.queues",
        "UPDATE pgsched.queues SET name = 'elsewhere'",
        "INSERT INTO pgsched.schedules (name, task, cron) VALUES ('mine', 'noop', '* * * * *')",
        "INSERT INTO pgsched.tasks (name) VALUES ('mine')",
        "SELECT pgsched.promote(1000)",
        "SELECT pgsched.rescue(1000)",
        "SELECT pgsched.prune_jobs(1000)",
        "SET ROLE pgsched_worker",
        "SET ROLE pgsched_admin",
    ],
    "pgsched_admin": [
        "CREATE TABLE pgsched.mine2 (x int)",
        "SET ROLE postgres",
        "GRANT pgsched_admin TO pgsched_enqueuer",
        "GRANT pgsched_owner TO pgsched_admin",
        "ALTER TABLE pgsched.jobs DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE pgsched.runs DETACH PARTITION pgsched.runs_default",
    ],
}


def fingerprint(conn: psycopg.Connection[Any], *, relations: bool = True) -> dict[str, Any]:
    """What an attack could change: rows, objects and owners, function bodies and settings,
    privileges, role memberships and attributes, triggers (without rows and relations: what a
    call that may create jobs and history partitions must still leave alone). Roles are the
    cluster's: only pgsched's group roles count, not the logins other tests make meanwhile on a
    shared server (PGSCHED_TEST_DSN)."""
    rows = row_counts(conn)
    objects = conn.execute(
        """SELECT c.relname, c.relkind, c.relowner::regrole::text, c.relacl::text, c.relrowsecurity
           FROM pg_class c WHERE c.relnamespace = 'pgsched'::regnamespace ORDER BY 1"""
    ).fetchall()
    functions = conn.execute(
        """SELECT p.oid::regprocedure::text, md5(p.prosrc), p.prosecdef, p.proconfig, p.proowner::regrole::text,
                  p.proacl::text
           FROM pg_proc p WHERE p.pronamespace = 'pgsched'::regnamespace ORDER BY 1"""
    ).fetchall()
    triggers = conn.execute(
        "SELECT tgname, tgenabled, tgfoid::regproc::text FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1"
    ).fetchall()
    roles = conn.execute(
        """SELECT r.rolname, r.rolsuper, r.rolcanlogin, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls,
                  ARRAY(SELECT m.roleid::regrole::text FROM pg_auth_members m WHERE m.member = r.oid ORDER BY 1)
           FROM pg_roles r WHERE r.rolname LIKE 'pgs%' AND NOT r.rolcanlogin ORDER BY 1"""
    ).fetchall()
    schema = conn.execute("SELECT nspname, nspowner::regrole::text, nspacl::text FROM pg_namespace").fetchall()
    if not relations:
        return {"catalog": hashlib.sha256(repr((functions, triggers, roles, schema)).encode()).hexdigest()}
    digest = hashlib.sha256(repr((objects, functions, triggers, roles, schema)).encode()).hexdigest()
    return {"rows": rows, "catalog": digest}


def attempt(connection: psycopg.Connection[Any], sql: str) -> str | None:
    """The SQLSTATE ``sql`` failed with, or None if it ran."""
    try:
        connection.execute(sql)
    except psycopg.Error as exc:
        return exc.sqlstate or type(exc).__name__
    return None


def seed(conn: psycopg.Connection[Any]) -> None:
    """Another tenant's jobs (one holds a card number), a shell job, a schedule, a user, an audit row."""
    conn.execute("INSERT INTO pgsched.tasks (name) VALUES ('noop')")
    conn.execute("""SELECT pgsched.enqueue('charge', '{"card": "4111"}', owner => 'team-a', dedupe_key => 'a')""")
    conn.execute("""SELECT pgsched.enqueue('shell', '{"cmd": ["true"]}')""")
    conn.execute("INSERT INTO pgsched.schedules (name, task, every) VALUES ('hourly', 'noop', '1 hour')")
    conn.execute("INSERT INTO pgsched.users (username) VALUES ('alice')")
    conn.execute("INSERT INTO pgsched.audit_log (actor, action, target_type) VALUES ('alice', 'job.cancel', 'job')")
    conn.execute("INSERT INTO pgsched.queues (name, max_running) VALUES ('default', 5)")


@pytest.mark.parametrize("group", GROUPS)
def test_each_role_is_refused_what_it_must_not_do(login: Login, conn: psycopg.Connection[Any], group: str) -> None:  # noqa: F811
    seed(conn)
    _, attacker = login(group)
    before = fingerprint(conn)
    ran = []
    for sql in EVERY_ROLE_REFUSED + REFUSED[group]:
        state = attempt(attacker, sql)
        if state != DENIED:
            ran.append(f"{sql}: {state or 'ran'}")
    assert ran == [], "\n".join(ran)
    assert fingerprint(conn) == before


def test_no_pgsched_role_is_a_superuser_or_can_log_in(conn: psycopg.Connection[Any]) -> None:
    rows = conn.execute(
        """SELECT rolname, rolsuper, rolcanlogin, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication
           FROM pg_roles WHERE rolname LIKE 'pgsched%' ORDER BY 1"""
    ).fetchall()
    assert [r[0] for r in rows] == sorted([*GROUPS, "pgsched_owner", "pgsched_api_commands"])
    assert [r for r in rows if any(r[1:])] == []


# Every SECURITY DEFINER function of the schema, and the hostile calls made to it: (call, the
# SQLSTATE expected from a role allowed to execute it; None when it must run and gain nothing).
DEFINER_CALLS: dict[str, list[tuple[str, str | None]]] = {
    "pgsched.enqueue": [
        ("SELECT pgsched.enqueue('noop', '{\"a\": 1}')", None),
        ("SELECT pgsched.enqueue(NULL)", "23502"),
        ("SELECT pgsched.enqueue('noop', queue => 'x''; DROP TABLE pgsched.jobs; --')", "23514"),
        ("SELECT pgsched.enqueue(repeat('t', 100000))", "23514"),
        ("SELECT pgsched.enqueue('noop', depends_on => ARRAY[-1, NULL, 0]::bigint[])", "23503"),
        ("SELECT pgsched.enqueue('noop', depends_on => ARRAY(SELECT generate_series(1, 100000))::bigint[])", "23514"),
        ("SELECT pgsched.enqueue('noop', delay => '-infinity')", "22023"),
        ("SELECT pgsched.enqueue('noop', run_at => 'infinity')", "23514"),
        ("SELECT pgsched.enqueue('noop', owner => 'team-b', dedupe_key => 'a')", "23505"),
        ("SELECT pgsched.enqueue('noop', workflow_id => '00000000-0000-0000-0000-000000000000')", None),
    ],
    "pgsched.ensure_history_partitions": [
        ("SELECT pgsched.ensure_history_partitions(NULL)", "22023"),
        ("SELECT pgsched.ensure_history_partitions(-1)", "22023"),
        ("SELECT pgsched.ensure_history_partitions(2147483647)", "22023"),
        ("SELECT pgsched.ensure_history_partitions(1)", None),
    ],
    "pgsched.prune_history": [
        ("SELECT pgsched.prune_history(-1)", None),
        ("SELECT pgsched.prune_history(NULL)", None),
        ("SELECT pgsched.prune_history(2147483647)", None),
    ],
    "pgsched.queue_served": [
        ("SELECT pgsched.queue_served(NULL)", None),
        ("SELECT pgsched.queue_served(repeat('q', 100000))", None),
        ("SELECT pgsched.queue_served('default'' OR true --')", None),
    ],
}


def test_every_definer_function_is_attacked(conn: psycopg.Connection[Any]) -> None:
    definers = conn.execute(
        "SELECT DISTINCT p.oid::regproc::text FROM pg_proc p WHERE p.pronamespace = 'pgsched'::regnamespace AND p.prosecdef"
    ).fetchall()
    assert sorted(name for (name,) in definers) == sorted(DEFINER_CALLS)


def gains(conn: psycopg.Connection[Any], name: str) -> dict[str, Any]:
    """What an attacker could have gained: memberships, command jobs, objects it owns, function
    settings and bodies, triggers, the partitions of the history."""
    return {
        "member_of": conn.execute(
            "SELECT ARRAY(SELECT roleid::regrole::text FROM pg_auth_members WHERE member = %s::regrole ORDER BY 1)",
            (name,),
        ).fetchone(),
        "command_jobs": conn.execute("SELECT count(*) FROM pgsched.jobs WHERE task IN ('shell', 'http')").fetchone(),
        "owned": conn.execute(
            "SELECT count(*) FROM pg_class WHERE relowner = %s::regrole AND relnamespace = 'pgsched'::regnamespace",
            (name,),
        ).fetchone(),
        "catalog": fingerprint(conn, relations=False)["catalog"],
    }


@pytest.mark.parametrize("group", GROUPS)
def test_definer_functions_called_with_hostile_arguments_and_temporary_shadows(
    login: Login,  # noqa: F811
    conn: psycopg.Connection[Any],
    group: str,
) -> None:
    seed(conn)
    name, attacker = login(group)
    set_traps(attacker)  # pg_temp domains, views, functions and an operator that would grant pgsched_admin
    attacker.execute("SET search_path = pg_temp, pgsched, public")  # the functions pin their own
    before = gains(conn, name)
    wrong = []
    for function, calls in DEFINER_CALLS.items():
        allowed = conn.execute(
            "SELECT bool_or(has_function_privilege(%s, p.oid, 'EXECUTE')) FROM pg_proc p WHERE p.oid::regproc::text = %s",
            (name, function),
        ).fetchone()[0]
        for call, expected in calls:
            state = attempt(attacker, call)
            if state == "22007" and "'-infinity'" in call and conn.info.server_version < 170000:
                state = expected if allowed else DENIED  # no infinite interval before PostgreSQL 17
            if state != (expected if allowed else DENIED):
                wrong.append(f"{group}: {call}: {state or 'ran'}, expected {expected if allowed else DENIED}")
    assert wrong == [], "\n".join(wrong)
    assert gains(conn, name) == before
    assert conn.execute("SELECT pg_has_role(%s, 'pgsched_admin', 'MEMBER')", (name,)).fetchone() == (
        group == "pgsched_admin",
    )
