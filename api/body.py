"""A JSON body the decoder refuses, refused naming its field.

msgspec (Litestar's decoder) refuses ``NaN``, ``Infinity`` and numbers no float holds (``1e999``)
as malformed JSON, and nesting deeper than Python's recursion limit with a ``RecursionError``: the
first a 400 naming no field, the second a 500. Python's own ``json.dumps`` writes ``NaN`` and
``Infinity`` by default, so clients do send them. ``decode_body`` runs before a route reads its
body (the decoded body is cached, so it is decoded once) and answers such a body 422 with the
path of the value, as the library's validation names the field (``args.n``, ``jobs[1].timeout``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from litestar import Request
from litestar.exceptions import SerializationException

from pgsched.validation import MAX_JSON_DEPTH

from .errors import ApiError

_NUMBER = re.compile(rb"-?(?:Infinity|NaN|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


async def decode_body(request: Request[Any, Any, Any]) -> None:
    """Before a route: decode the JSON body once; a value JSON or a float cannot hold is a 422."""
    if request.method not in ("POST", "PATCH", "PUT"):
        return
    try:
        await request.json()
    except (SerializationException, RecursionError) as exc:
        body = await request.body()
        found = locate(body)
        if found is None:
            if isinstance(exc, RecursionError):
                raise ApiError(422, "the JSON body nests too deeply") from None
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        message, field = found
        raise ApiError(422, message, field=field or None) from None


def locate(body: bytes) -> tuple[str, str] | None:
    """The first value of ``body`` no float holds or nested past ``MAX_JSON_DEPTH``, and its path
    (``""`` for the body itself); None when there is none (the body is malformed elsewhere)."""
    path: list[str | int] = []  # the key or index of each open container
    expecting_key = [False]
    i, n = 0, len(body)
    while i < n:
        char = body[i : i + 1]
        if char == b'"':
            end = _string_end(body, i)
            if expecting_key[-1]:
                path[-1] = body[i + 1 : end].decode("utf-8", "replace")
            i = end + 1
            continue
        if char in b"{[":
            if len(path) > MAX_JSON_DEPTH:
                return f"nests objects and arrays more than {MAX_JSON_DEPTH} levels deep", _dotted(_outer(path))
            path.append(0 if char == b"[" else "")
            expecting_key.append(char == b"{")
        elif char in b"}]":
            if not path:
                return None  # a closer without an opener: malformed, nothing to name
            path.pop()
            expecting_key.pop()
        elif char == b":":
            expecting_key[-1] = False
        elif char == b"," and path:
            if isinstance(path[-1], int):
                path[-1] += 1
            else:
                expecting_key[-1] = True
        elif (number := _NUMBER.match(body, i)) is not None:
            text = number.group().decode()
            if not math.isfinite(float(text)):
                return f"{text} is not a finite number (JSON holds none)", _dotted(path)
            i = number.end()
            continue
        i += 1
    return None


def _string_end(body: bytes, start: int) -> int:
    i = start + 1
    while i < len(body) and body[i : i + 1] != b'"':
        i += 2 if body[i : i + 1] == b"\\" else 1
    return i


def _outer(path: list[str | int]) -> list[str | int]:
    """The path to the field whose value nests too deep: through list indexes (``jobs[1]``) to the
    first key whose value is not a list (``args``), not down the nesting itself."""
    for i, part in enumerate(path):
        if isinstance(part, str) and not (i + 1 < len(path) and isinstance(path[i + 1], int)):
            return path[: i + 1]
    return path


def _dotted(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out
