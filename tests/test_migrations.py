"""The migration runner: order, records, refusals, and clients refusing a schema that does not match."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import pgsched
from pgsched import SchemaError, migrations

pytestmark = pytest.mark.db


def test_migrate_applies_every_file_once_and_records_it(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        applied = migrations.migrate(conn)
        assert [m.version for m in applied] == [m.version for m in migrations.available()]
        assert migrations.migrate(conn) == []
        rows = conn.execute("SELECT version, name, checksum FROM pgsched.schema_migrations ORDER BY version").fetchall()
        assert rows == [(m.version, m.name, m.checksum) for m in migrations.available()]
        migrations.check(conn)


def test_the_files_ship_in_order_and_never_change_shape() -> None:
    available = migrations.available()
    assert [m.version for m in available] == list(range(1, len(available) + 1))
    assert available[0].name == "schema" and "CREATE TABLE pgsched.jobs" in available[0].sql


def test_an_edited_migration_is_refused(conn: psycopg.Connection[Any]) -> None:
    conn.execute("UPDATE pgsched.schema_migrations SET checksum = 'edited' WHERE version = 1")
    for call in (migrations.migrate, migrations.check):
        with pytest.raises(SchemaError, match="edited after it was applied"):
            call(conn)


def test_a_newer_database_is_refused(conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO pgsched.schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')")
    for call in (migrations.migrate, migrations.check):
        with pytest.raises(SchemaError, match="newer than this pgsched"):
            call(conn)


def test_a_schema_without_history_is_not_touched(empty_dsn: str) -> None:
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA pgsched")
        with pytest.raises(SchemaError, match="no migration history"):
            migrations.migrate(conn)
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'pgsched'").fetchone()[0] == 0


def test_clients_refuse_an_unmigrated_or_outdated_database(empty_dsn: str, dsn: str) -> None:
    for target in (empty_dsn, dsn):
        if target == dsn:  # make the migrated database look one migration behind
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM pgsched.schema_migrations WHERE version = %s", (len(migrations.available()),))
        app = pgsched.App(target)
        with pytest.raises(SchemaError, match="run `pgsched migrate`"):
            app.enqueue("shell", {"cmd": ["true"]})
        with psycopg.connect(target) as conn, pytest.raises(SchemaError, match="run `pgsched migrate`"):
            app.enqueue("shell", {"cmd": ["true"]}, connection=conn)
        app.close()
