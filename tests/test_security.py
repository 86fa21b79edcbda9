"""Database security, tested by performing each attack as the role that would try it (issue 18).

Every test logs in as a fresh LOGIN role that is a member of one pgsched group
only, does what an attacker holding that role would do, and reads the outcome
as a superuser: role memberships, rows of pgsched.jobs, locks.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgsched
from pgsched import DuplicateJobError, ValidationError
from pgsched.validation import MAX_DEPENDENCIES, error_from_db

pytestmark = pytest.mark.db

Login = Callable[[str], tuple[str, psycopg.Connection[Any]]]


def one(connection: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = connection.execute(sql, params or None).fetchone()
    assert row is not None
    return row[0] if len(row) == 1 else row


@pytest.fixture
def login(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[Login]:
    """A LOGIN role in one pgsched group (or none: ``""``) and an autocommit connection as it."""
    created: list[str] = []
    connections: list[psycopg.Connection[Any]] = []

    def connect(group: str) -> tuple[str, psycopg.Connection[Any]]:
        name = f"pgs_attacker_{uuid.uuid4().hex[:8]}"
        conn.execute(f'CREATE ROLE "{name}" LOGIN' + (f" IN ROLE {group}" if group else ""))
        created.append(name)
        params = {**conninfo_to_dict(dsn), "user": name}
        params.pop("password", None)
        connection = psycopg.connect(make_conninfo(**params), autocommit=True)
        connections.append(connection)
        return name, connection

    yield connect
    for connection in connections:
        if not connection.closed:
            connection.rollback()
            connection.execute("DISCARD TEMP")  # temporary objects would keep the role from being dropped
            connection.close()
    for name in created:
        conn.execute(f'DROP OWNED BY "{name}"')
        conn.execute(f'DROP ROLE "{name}"')


# What an attacker's code does once it runs with the rights of a definer function's owner: make
# its login an admin and enqueue a shell job. Guarded by a setting, since the jobs insert below
# runs trigger code that declares text variables too.
EVIL = """
CREATE FUNCTION pg_temp.evil(pg_catalog.text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF pg_catalog.current_setting('evil.done', true) = '1' THEN
        RETURN true;
    END IF;
    PERFORM pg_catalog.set_config('evil.done', '1', false);
    EXECUTE pg_catalog.format('GRANT pgsched_admin TO %I', session_user);
    INSERT INTO pgsched.jobs (task, args) VALUES ('shell', '{"cmd": ["sh", "-c", "id > /tmp/owned"]}');
    RETURN true;
END
$$
"""

# Temporary objects named like the types, relations, functions and operators the definer
# functions use: PostgreSQL searches pg_temp first for types and relations unless the
# function's search_path lists it (last).
TRAPS = [
    *(
        f"CREATE DOMAIN pg_temp.{name} AS pg_catalog.{name} CHECK (pg_temp.evil(VALUE::pg_catalog.text))"
        for name in ("text", "int4", "int8", "date", "jsonb", "timestamptz", "bool", "interval")
    ),
    "CREATE DOMAIN pg_temp.integer AS pg_catalog.int4 CHECK (pg_temp.evil(VALUE::pg_catalog.text))",
    "CREATE DOMAIN pg_temp.bigint AS pg_catalog.int8 CHECK (pg_temp.evil(VALUE::pg_catalog.text))",
    "CREATE DOMAIN pg_temp.boolean AS pg_catalog.bool CHECK (pg_temp.evil(VALUE::pg_catalog.text))",
    # A view in pg_temp shadows a catalog an unqualified query reads (prune_history's pg_inherits).
    """CREATE VIEW pg_temp.pg_inherits AS
       SELECT inhrelid, inhparent, inhseqno FROM pg_catalog.pg_inherits WHERE pg_temp.evil('x')""",
    """CREATE VIEW pg_temp.pg_class AS
       SELECT oid, relname, relkind FROM pg_catalog.pg_class WHERE pg_temp.evil('x')""",
    # Functions and operators are never looked up in pg_temp; shown here to stay so.
    "CREATE FUNCTION pg_temp.cardinality(anyarray) RETURNS integer LANGUAGE sql AS 'SELECT 1 WHERE pg_temp.evil(''x'')'",
    "CREATE FUNCTION pg_temp.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT pg_catalog.now() WHERE pg_temp.evil(''x'')'",
    """CREATE FUNCTION pg_temp.eq(pg_catalog.text, pg_catalog.text) RETURNS boolean LANGUAGE sql
       AS 'SELECT pg_temp.evil($1) AND $1 OPERATOR(pg_catalog.=) $2'""",
    "CREATE OPERATOR pg_temp.= (LEFTARG = pg_catalog.text, RIGHTARG = pg_catalog.text, FUNCTION = pg_temp.eq)",
]


def set_traps(attacker: psycopg.Connection[Any]) -> None:
    attacker.execute(EVIL)
    for trap in TRAPS:
        attacker.execute(trap)


def assert_gained_nothing(conn: psycopg.Connection[Any], name: str) -> None:
    assert one(conn, "SELECT pg_has_role(%s, 'pgsched_admin', 'MEMBER')", name) is False
    assert one(conn, "SELECT count(*) FROM pgsched.jobs WHERE task = 'shell'") == 0


def test_temporary_objects_gain_an_enqueuer_nothing(login: Login, conn: psycopg.Connection[Any]) -> None:
    name, enqueuer = login("pgsched_enqueuer")
    dep = one(conn, "INSERT INTO pgsched.jobs (task) VALUES ('extract') RETURNING id")
    set_traps(enqueuer)
    assert one(enqueuer, "SELECT state FROM pgsched.enqueue('load', '{\"day\": 0}')") == "queued"
    assert_gained_nothing(conn, name)
    # Every path of the function: dependencies, dedupe, delay.
    row = enqueuer.execute(
        "SELECT id, state FROM pgsched.enqueue('load', '{\"day\": 1}', depends_on => ARRAY[%s]::bigint[],"
        " dedupe_key => 'load-1', delay => interval '1 minute')",
        (dep,),
    ).fetchone()
    assert row is not None and row[1] == "waiting"
    with pytest.raises(psycopg.errors.UniqueViolation):
        enqueuer.execute("SELECT pgsched.enqueue('load', dedupe_key => 'load-1')")
    assert_gained_nothing(conn, name)


def test_temporary_objects_gain_a_worker_nothing_in_the_maintenance_functions(
    login: Login, conn: psycopg.Connection[Any]
) -> None:
    name, worker = login("pgsched_worker")
    # Something for prune_history to drop and delete: an old partition and old default rows.
    conn.execute("SET pgsched.clock_offset = '-400 days'")
    conn.execute("SELECT pgsched.ensure_history_partitions(0)")
    conn.execute("RESET pgsched.clock_offset")
    old = one(conn, "SELECT 'pgsched.runs_' || to_char(pgsched.now() - interval '400 days', 'YYYYMMDD')")
    conn.execute(
        "INSERT INTO pgsched.runs (job_id, attempt, queue, task, outcome, started_at, finished_at)"
        " VALUES (1, 1, 'q', 't', 'succeeded', '2001-01-01', '2001-01-01')"
    )
    set_traps(worker)
    worker.execute("SELECT pgsched.ensure_history_partitions(2)")
    worker.execute("SELECT pgsched.prune_history(10)")
    assert_gained_nothing(conn, name)
    assert one(conn, "SELECT to_regclass(%s)", old) is None


def test_every_security_definer_function_is_pinned_owned_by_a_nologin_non_superuser_and_not_public(
    conn: psycopg.Connection[Any],
) -> None:
    rows = conn.execute(
        """SELECT p.oid::regprocedure::text, p.proconfig, r.rolname, r.rolsuper, r.rolcanlogin,
                  pg_has_role(r.oid, 'pgsched_admin', 'MEMBER'),
                  has_function_privilege('public', p.oid, 'EXECUTE')
           FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
           WHERE p.pronamespace = 'pgsched'::regnamespace AND p.prosecdef"""
    ).fetchall()
    assert {r[0].split("(")[0] for r in rows} >= {
        "pgsched.enqueue",
        "pgsched.ensure_history_partitions",
        "pgsched.prune_history",
    }
    for function, config, owner, superuser, can_login, admin, public in rows:
        paths = [c.split("=", 1)[1] for c in config or [] if c.startswith("search_path=")]
        assert paths and paths[0].replace(" ", "").split(",")[-1] == "pg_temp", (function, config)
        assert not superuser and not can_login and not admin, (function, owner)
        assert not public, function


def test_no_function_of_the_schema_is_executable_by_public(conn: psycopg.Connection[Any]) -> None:
    public = conn.execute(
        """SELECT p.oid::regprocedure::text FROM pg_proc p
           WHERE p.pronamespace = 'pgsched'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE')"""
    ).fetchall()
    assert public == []


def test_a_worker_cannot_rewrite_a_queued_shell_job(login: Login, conn: psycopg.Connection[Any]) -> None:
    job_id = one(conn, """SELECT id FROM pgsched.enqueue('shell', '{"cmd": ["true"]}')""")
    plain_id = one(conn, "SELECT id FROM pgsched.enqueue('noop')")
    before = one(conn, "SELECT to_jsonb(j) FROM pgsched.jobs j WHERE id = %s", job_id)
    _, worker = login("pgsched_worker")
    for assignment in (
        """args = '{"cmd": ["sh", "-c", "id > /tmp/owned"]}'""",
        "task = 'http'",
        "queue = 'elsewhere'",
        "created_by = 'someone'",
        "owner = 'someone'",
    ):
        for target in (job_id, plain_id):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                worker.execute(f"UPDATE pgsched.jobs SET {assignment} WHERE id = %s", (target,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        worker.execute("UPDATE pgsched.jobs SET task = 'shell' WHERE id = %s", (plain_id,))
    assert one(conn, "SELECT to_jsonb(j) FROM pgsched.jobs j WHERE id = %s", job_id) == before
    assert one(conn, "SELECT task FROM pgsched.jobs WHERE id = %s", plain_id) == "noop"
    # What a worker does still works: claim, progress, finish.
    worker.execute(
        "UPDATE pgsched.jobs SET state = 'running', attempts = attempts + 1, worker_id = gen_random_uuid(),"
        " started_at = now() WHERE id = %s",
        (job_id,),
    )
    worker.execute(
        "UPDATE pgsched.jobs SET state = 'succeeded', result = '{}', finished_at = now(), worker_id = NULL,"
        " progress = '{}' WHERE id = %s",
        (job_id,),
    )
    assert one(conn, "SELECT state FROM pgsched.jobs WHERE id = %s", job_id) == "succeeded"


def test_command_job_args_change_only_by_allowed_roles_which_become_the_creator(
    login: Login, conn: psycopg.Connection[Any]
) -> None:
    job_id = one(conn, """SELECT id FROM pgsched.enqueue('shell', '{"cmd": ["true"]}')""")
    # A role the operator gave UPDATE on args (but not the right to create command jobs).
    _, editor = login("pgsched_reader")
    conn.execute("GRANT SELECT, UPDATE (args, task) ON pgsched.jobs TO pgsched_reader")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            editor.execute("""UPDATE pgsched.jobs SET args = '{"cmd": ["id"]}' WHERE id = %s""", (job_id,))
    finally:
        conn.execute("REVOKE SELECT, UPDATE (args, task) ON pgsched.jobs FROM pgsched_reader")
    assert one(conn, "SELECT args FROM pgsched.jobs WHERE id = %s", job_id) == {"cmd": ["true"]}
    admin_name, admin = login("pgsched_admin")
    admin.execute("""UPDATE pgsched.jobs SET args = '{"cmd": ["date"]}' WHERE id = %s""", (job_id,))
    assert one(conn, "SELECT args, created_by FROM pgsched.jobs WHERE id = %s", job_id) == (
        {"cmd": ["date"]},
        admin_name,
    )


def test_a_worker_cannot_rewrite_a_shell_schedule(login: Login, conn: psycopg.Connection[Any]) -> None:
    schedule = one(
        conn,
        """INSERT INTO pgsched.schedules (name, task, args, cron) VALUES ('nightly', 'shell', '{"cmd": ["true"]}', '0 3 * * *')
           RETURNING id""",
    )
    _, worker = login("pgsched_worker")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        worker.execute("""UPDATE pgsched.schedules SET args = '{"cmd": ["id"]}' WHERE id = %s""", (schedule,))
    assert one(conn, "SELECT args FROM pgsched.schedules WHERE id = %s", schedule) == {"cmd": ["true"]}
    worker.execute("UPDATE pgsched.schedules SET next_run_at = now() WHERE id = %s", (schedule,))


def locked_by_others(conn: psycopg.Connection[Any], job_ids: list[int]) -> list[int]:
    """The jobs among ``job_ids`` whose row another transaction holds a lock on."""
    locked = []
    for job_id in job_ids:
        try:
            with conn.transaction():
                conn.execute("SELECT 1 FROM pgsched.jobs WHERE id = %s FOR UPDATE NOWAIT", (job_id,))
        except psycopg.errors.LockNotAvailable:
            locked.append(job_id)
    return locked


def test_an_enqueuer_cannot_lock_every_job_through_depends_on(login: Login, conn: psycopg.Connection[Any]) -> None:
    ids = [
        r[0]
        for r in conn.execute("INSERT INTO pgsched.jobs (task) SELECT 'a' FROM generate_series(1, 150) RETURNING id")
    ]
    _, enqueuer = login("pgsched_enqueuer")
    before = one(conn, "SELECT count(*) FROM pgsched.jobs")
    with enqueuer.transaction():
        with pytest.raises(psycopg.errors.CheckViolation) as caught:
            enqueuer.execute("SELECT pgsched.enqueue('b', depends_on => ARRAY(SELECT id FROM pgsched.jobs))")
        mapped = error_from_db(caught.value)
        assert isinstance(mapped, ValidationError) and mapped.field == "depends_on"
        assert str(MAX_DEPENDENCIES) in mapped.message
        # The transaction is aborted; it holds no row lock either.
        assert locked_by_others(conn, ids) == []
    assert one(conn, "SELECT count(*) FROM pgsched.jobs") == before
    # Up to the cap works.
    assert (
        one(enqueuer, "SELECT state FROM pgsched.enqueue('b', depends_on => %s)", ids[:MAX_DEPENDENCIES]) == "waiting"
    )


def test_the_dependency_cap_holds_for_direct_edges_and_in_python(
    app: pgsched.App, conn: psycopg.Connection[Any]
) -> None:
    ids = [
        r[0]
        for r in conn.execute("INSERT INTO pgsched.jobs (task) SELECT 'a' FROM generate_series(1, 102) RETURNING id")
    ]
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        conn.execute("INSERT INTO pgsched.job_deps SELECT %s, unnest(%s::bigint[])", (ids[0], ids[1:]))
    mapped = error_from_db(caught.value)
    assert isinstance(mapped, ValidationError) and mapped.field == "depends_on"
    assert one(conn, "SELECT count(*) FROM pgsched.job_deps") == 0
    conn.execute(
        "INSERT INTO pgsched.job_deps SELECT %s, unnest(%s::bigint[])", (ids[0], ids[1 : MAX_DEPENDENCIES + 1])
    )

    conn.execute("INSERT INTO pgsched.tasks (name) VALUES ('b')")
    before = one(conn, "SELECT count(*) FROM pgsched.jobs")
    with pytest.raises(ValidationError) as raised:
        app.enqueue("b", {}, depends_on=ids[: MAX_DEPENDENCIES + 1])
    assert raised.value.field == "depends_on"
    assert one(conn, "SELECT count(*) FROM pgsched.jobs") == before


def test_enqueue_does_not_reveal_another_owners_jobs(login: Login, conn: psycopg.Connection[Any]) -> None:
    theirs = one(conn, "SELECT id FROM pgsched.enqueue('a', owner => 'team-a', dedupe_key => 'a-key')")
    _, enqueuer = login("pgsched_enqueuer")

    def dependency_error(dep: int) -> tuple[str, str | None, str | None]:
        with pytest.raises(psycopg.errors.ForeignKeyViolation) as caught:
            enqueuer.execute(
                "SELECT pgsched.enqueue('b', owner => 'team-b', depends_on => ARRAY[%s]::bigint[])", (dep,)
            )
        diag = caught.value.diag
        return (diag.message_primary or "", (diag.message_detail or "").replace(str(dep), "N"), diag.constraint_name)

    missing = one(conn, "SELECT max(id) + 1000 FROM pgsched.jobs")
    assert dependency_error(theirs) == dependency_error(missing)
    # Trying did not lock their job.
    with enqueuer.transaction():
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            enqueuer.execute(
                "SELECT pgsched.enqueue('b', owner => 'team-b', depends_on => ARRAY[%s]::bigint[])", (theirs,)
            )
        assert locked_by_others(conn, [theirs]) == []

    with pytest.raises(psycopg.errors.UniqueViolation) as caught:
        enqueuer.execute("SELECT pgsched.enqueue('b', owner => 'team-b', dedupe_key => 'a-key')")
    detail = f"{caught.value.diag.message_primary} {caught.value.diag.message_detail}"
    assert str(theirs) not in detail
    duplicate = error_from_db(caught.value)
    assert isinstance(duplicate, DuplicateJobError) and duplicate.existing_id is None
    # The same owner is told which job holds its key, and may depend on its own jobs.
    with pytest.raises(psycopg.errors.UniqueViolation) as caught:
        enqueuer.execute("SELECT pgsched.enqueue('b', owner => 'team-a', dedupe_key => 'a-key')")
    duplicate = error_from_db(caught.value)
    assert isinstance(duplicate, DuplicateJobError) and duplicate.existing_id == theirs
    assert (
        one(
            enqueuer,
            "SELECT state FROM pgsched.enqueue('b', owner => 'team-a', depends_on => ARRAY[%s]::bigint[])",
            theirs,
        )
        == "waiting"
    )


@pytest.mark.parametrize("days_ahead", [-1, 61, 100_000])
def test_history_partitions_ahead_are_bounded(conn: psycopg.Connection[Any], days_ahead: int) -> None:
    before = one(conn, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'pgsched.runs'::regclass")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="days_ahead"):
        conn.execute("SELECT pgsched.ensure_history_partitions(%s)", (days_ahead,))
    assert one(conn, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'pgsched.runs'::regclass") == before
    assert one(conn, "SELECT pgsched.ensure_history_partitions(60)") > 0
