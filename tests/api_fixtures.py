"""Fixtures of the REST API tests: a database login in pgsched_api (subject to row-level security),
one user and token per role, and Litestar's test client on the real app and database."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsched import accounts, load_settings
from pgsched.db import configure_adapters, run

# The users of every API test: username -> role. alice and bob are two tenants.
USERS = {"root": "admin", "ops": "operator", "alice": "member", "bob": "member", "vera": "viewer"}


def login_dsn(dsn: str, name: str) -> str:
    params = {**conninfo_to_dict(dsn), "user": name}
    params.pop("password", None)
    return make_conninfo(**params)


@pytest.fixture
def api_dsn(dsn: str, conn: psycopg.Connection[Any]) -> Iterator[str]:
    """A LOGIN role that is a member of pgsched_api only, and its DSN."""
    name = f"pgs_api_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE pgsched_api')
    yield login_dsn(dsn, name)
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()",
        (name,),
    )
    conn.execute(f'DROP OWNED BY "{name}"')
    conn.execute(f'DROP ROLE "{name}"')


@pytest.fixture
def tokens(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """username -> bearer token, for the users of USERS (alice may create shell/http jobs: no)."""
    configure_adapters(conn.adapters)
    audit = accounts.Audit(actor="test")
    out = {}
    with conn.transaction():
        conn.execute("INSERT INTO pgsched.tasks (name) VALUES ('noop'), ('report')")
        for name, role in USERS.items():
            user = run(conn, accounts.op_create_user(audit, name, role))
            out[name] = run(conn, accounts.op_create_token(audit, user, "test"))[1]
    return out


@pytest.fixture
def client(dsn: str, api_dsn: str, tokens: dict[str, str]) -> Iterator[Any]:
    from litestar.testing import TestClient

    from pgsched.api import create_app

    app = create_app(load_settings({"dsn": dsn, "api_dsn": api_dsn}))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def as_user(client: Any, tokens: dict[str, str]) -> Callable[[str], dict[str, str]]:
    """The Authorization header of a user."""
    return lambda name: {"Authorization": f"Bearer {tokens[name]}"}
