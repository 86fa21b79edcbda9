"""The REST API door of the bad-input list (issue 19): every input of ``tests/test_bad_input.py``
through ``POST /api/v1/jobs``, as the second job of ``POST /api/v1/jobs/batch``, and every bad
schedule through ``POST /api/v1/schedules``, as a member (a tenant without the shell/http
permission). Each must be answered 422 with ``{"error": {"code", "message", "field"}}`` naming the
field the library door names (``jobs[1].`` before it in a batch), and every table's row count must
stay as it was.

``NaN`` and ``Infinity`` are sent as Python's ``json.dumps`` writes them (literals outside JSON,
which clients send all the same), and infinity once more as ``1e999``, a JSON number no float holds.
Three answers are not 422, each for a reason: a body that is not JSON at all is 400 naming no field
(there is none to name); one over the API's body cap is 413 before any field is read; a shell or
http job by a user without the permission is 403 naming ``task``, as the library's
``PermissionDenied`` is at its doors.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from .conftest import row_counts
from .test_bad_input import BAD, BAD_SCHEDULES, SKIP, Bad, BadSchedule, names_field

pytestmark = pytest.mark.db

NOT_JSON = "args is not JSON"
TOO_LARGE = "args over 1 MiB"  # over MAX_BODY_BYTES (256 KiB): 413 while the body is read


FORBIDDEN = ("shell job by an enqueuer", "http job by an enqueuer")


def spelt(value: Any) -> Any:
    """A Python option as JSON carries it."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


def body_of(bad: Bad) -> str:
    """The JSON text of one job of ``bad``, its args as the table writes them."""
    if bad.python is SKIP:  # args Python cannot hold, or a time Python has no value for
        options = {} if bad.field == "args" else {bad.field: bad.cli[1] if bad.cli else None}
    else:
        options = {name: spelt(value) for name, value in bad.python.items()}
    text = json.dumps({"task": bad.task, **options})
    return f'{text[:-1]}, "args": {bad.args}}}'


# Infinity as a JSON number out of every float's range.
OUT_OF_RANGE = [
    Bad("args hold 1e999", "args", args='{"n": [1, 1e999]}'),
    Bad("timeout 1e999", "timeout", args="{}", python={"timeout": 1e999}),
]


def problem(bad_name: str, field: str, response: Any, prefix: str = "") -> str | None:
    """What is wrong with the API's answer (None: a 422 naming the field, or the exceptions above)."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{bad_name}: {response.status_code} without the error body: {response.text[:200]!r}"
    if set(error) < {"code", "message", "field"}:
        return f"{bad_name}: error body {error!r}"
    if bad_name.endswith(TOO_LARGE) and response.status_code == 413:
        return None
    if bad_name.endswith(NOT_JSON) and response.status_code == 400:
        return None
    if bad_name.endswith(FORBIDDEN) and response.status_code == 403 and error["field"] == prefix + "task":
        return None
    if response.status_code != 422:
        return f"{bad_name}: {response.status_code} {error!r}"
    named = error["field"] or ""
    if not named.startswith(prefix) or not names_field(named.removeprefix(prefix), field):
        return f"{bad_name}: refused naming {error['field']!r}, not {prefix + field!r} ({error['message']})"
    return None


def try_each(conn: psycopg.Connection[Any], rows: list[tuple[str, str, Any]]) -> list[str]:
    """``rows``: (name, field, send) with ``send() -> (response, prefix)``; the problems found."""
    problems = []
    for name, field, send in rows:
        before = row_counts(conn)
        response, prefix = send()
        found = problem(name, field, response, prefix)
        after = row_counts(conn)
        if found:
            problems.append(found)
        if after != before:
            changed = {t: (before[t], after[t]) for t in before if before[t] != after.get(t)}
            problems.append(f"{name}: row counts changed {changed}")
    return problems


def test_jobs_refuse_every_bad_input_naming_the_field(client: Any, as_user: Any, conn: psycopg.Connection[Any]) -> None:
    headers = {**as_user("alice"), "Content-Type": "application/json"}
    rows = []
    for bad in BAD + OUT_OF_RANGE:
        body = body_of(bad).replace("Infinity, ", "1e999, ") if bad.name == "timeout 1e999" else body_of(bad)

        def one(body: str = body) -> Any:
            return client.post("/api/v1/jobs", content=body, headers=headers), ""

        def batch(body: str = body) -> Any:
            jobs = f'{{"jobs": [{{"task": "noop"}}, {body}]}}'
            return client.post("/api/v1/jobs/batch", content=jobs, headers=headers), "jobs[1]."

        rows += [(f"POST /jobs: {bad.name}", bad.field, one), (f"POST /jobs/batch: {bad.name}", bad.field, batch)]
    assert len(rows) == 2 * (len(BAD) + len(OUT_OF_RANGE)), len(rows)
    problems = try_each(conn, rows)
    assert problems == [], "\n".join(problems)


def schedule_body(bad: BadSchedule) -> str:
    options = {name: spelt(value) for name, value in bad.python.items()}
    return json.dumps({"name": "nightly", "task": "noop", **options})


def test_schedules_refuse_every_bad_input_naming_the_field(
    client: Any,
    as_user: Any,
    conn: psycopg.Connection[Any],
) -> None:
    headers = {**as_user("alice"), "Content-Type": "application/json"}
    rows = []
    for bad in BAD_SCHEDULES:

        def send(body: str = schedule_body(bad)) -> Any:
            return client.post("/api/v1/schedules", content=body, headers=headers), ""

        rows.append((f"POST /schedules: {bad.name}", bad.field, send))
    problems = try_each(conn, rows)
    assert problems == [], "\n".join(problems)


def test_bodies_that_are_not_json_are_400_naming_nothing(
    client: Any, as_user: Any, conn: psycopg.Connection[Any]
) -> None:
    headers = {**as_user("alice"), "Content-Type": "application/json"}
    before = row_counts(conn)
    for body in ("}", "]]", ",", '{"task": "noop"}}', '{"task": "noop",', "[1, 2", '{"a": [}', "\u0000"):
        response = client.post("/api/v1/jobs", content=body, headers=headers)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["field"] is None
    assert row_counts(conn) == before
