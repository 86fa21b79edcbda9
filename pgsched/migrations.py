"""The migration runner: applies ``sql/NNNN_name.sql`` files in order.

Each pending file is applied in its own transaction that first takes a
transaction-scoped advisory lock, then re-reads what is applied: so any number
of processes may run ``pgsched migrate`` at once (one applies, the others find
nothing left to do), and it works behind a transaction-mode pooler. The
version, name and SHA-256 of every applied file are recorded in
``pgsched.schema_migrations``; a database whose applied file was edited, or
that is newer than this code, is refused.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources

import psycopg

from . import queries
from .errors import SchemaError

# Key of the advisory lock held while a migration is applied ("pgsmigr").
MIGRATION_LOCK_KEY = 0x7067736D69677272

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One migration file shipped with the package."""

    version: int
    name: str
    sql: str = field(repr=False)

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The migration files shipped with this code, in version order."""
    found = []
    for entry in resources.files("pgsched.sql").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaError(f"migration files must be numbered 0001, 0002, ... without gaps; found {versions}")
    return found


def _applied(conn: psycopg.Connection) -> dict[int, tuple[str, str]]:
    exists = conn.execute(queries.SCHEMA_PRESENT).fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute(queries.APPLIED_MIGRATIONS).fetchall()
    return {version: (name, checksum) for version, name, checksum in rows}


def _compare(applied: dict[int, tuple[str, str]], code: list[Migration]) -> list[Migration]:
    """The migrations still to apply; raises SchemaError for an edited or newer database."""
    by_version = {m.version: m for m in code}
    for version, (name, checksum) in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            raise SchemaError(
                f"the database schema is at version {max(applied)}, newer than this pgsched "
                f"(which knows up to {len(code)}): upgrade pgsched"
            )
        if checksum != migration.checksum:
            raise SchemaError(
                f"migration {version:04d}_{name}.sql was edited after it was applied "
                "(checksum mismatch); restore the file and add a new migration instead"
            )
    return [m for m in code if m.version not in applied]


def pending(conn: psycopg.Connection) -> list[Migration]:
    """Migrations not yet applied to the database behind ``conn``."""
    return _compare(_applied(conn), available())


def migrate(conn: psycopg.Connection) -> list[Migration]:
    """Apply every pending migration; returns those this call applied. ``conn`` must be in autocommit mode."""
    code = available()
    done = []
    for migration in code:
        with conn.transaction():
            conn.execute(queries.MIGRATION_LOCK, (MIGRATION_LOCK_KEY,))
            if migration not in _compare(_applied(conn), code):
                continue
            if migration.version == 1:
                schema = conn.execute(queries.SCHEMA_EXISTS).fetchone()
                if schema and schema[0]:
                    raise SchemaError("schema pgsched exists but has no migration history; refusing to touch it")
            conn.execute(migration.sql.encode())
            conn.execute(queries.RECORD_MIGRATION, (migration.version, migration.name, migration.checksum))
        done.append(migration)
    return done


def check(conn: psycopg.Connection) -> None:
    """Raise SchemaError unless the database is migrated to exactly this code's version."""
    check_applied(_applied(conn))


def check_applied(applied: dict[int, tuple[str, str]]) -> None:
    """The check of ``check`` on already-read ``schema_migrations`` rows (for the async client)."""
    if not applied:
        raise SchemaError("the database has no pgsched schema: run `pgsched migrate`")
    todo = _compare(applied, available())
    if todo:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in todo)
        raise SchemaError(f"the database schema is outdated (pending: {names}): run `pgsched migrate`")
