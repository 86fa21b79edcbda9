"""A schema-driven fuzz run: schemathesis generates requests from the API's own OpenAPI document
(authenticated as an admin, a few examples per operation) against the real app and database; no
answer may be a 5xx, and every answer must match the document."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.db


def test_no_operation_answers_5xx_or_off_schema(client: Any, as_user: Any) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import response_schema_conformance

    client.app.state.failed_authentications.limit = 10**6
    document = client.get("/api/v1/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    headers = as_user("root")
    problems: list[str] = []
    calls: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() == "DELETE" and operation.path.startswith("/api/v1/tokens"):
            continue  # it would revoke the token the run authenticates with (tested in test_api.py)
        if operation.path == "/api/v1/events":
            continue  # a stream stays open up to max_seconds, and the test client reads it whole (test_api_events.py)

        @settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            kwargs = case.as_transport_kwargs(headers=headers)
            response = client.request(
                case.method,
                case.formatted_path,
                params=kwargs.get("params"),
                content=kwargs.get("data") or kwargs.get("content"),
                json=kwargs.get("json"),
                headers={k: v for k, v in kwargs.get("headers", {}).items() if k.lower() != "content-length"},
            )
            calls.append(response.status_code)
            if response.status_code >= 500:
                problems.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")
            try:
                case.validate_response(response, checks=[response_schema_conformance])
            except (Exception, BaseExceptionGroup) as exc:  # one group listing the failed checks
                problems.append(f"{case.method} {case.formatted_path}: {str(exc)[:300]}")

        run()
    assert problems == []
    # It did call, reaching handlers and validation (whether a random body creates something varies).
    assert len(calls) > 100 and {200, 422} <= set(calls)
