"""Input validation shared by every way in (Python API, CLI, REST, bulk enqueue).

Everything is checked before anything is written, and every failure is a
``ValidationError`` whose ``field`` names the input. The database enforces the
same rules with named constraints as a second line; ``error_from_db`` maps
those constraint names back to the same fields.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psycopg
import psycopg.errors

from .errors import DuplicateJobError, InvalidStateError, JobNotFound, PermissionDenied, SchemaError, ValidationError

ARGS_MAX_BYTES = 1024 * 1024
NAME_MAX_LENGTH = 200
QUEUE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
PRIORITY_RANGE = (-100, 100)
MAX_BIGINT = 2**63 - 1
MAX_INTEGER = 2**31 - 1
# Each dependency is locked by the enqueuing transaction until it ends and walked by the cycle
# check; the database refuses more too (sql/0005_security.sql). Wider fan-ins are a tree of jobs.
MAX_DEPENDENCIES = 100
# Args (and schedule args, progress) nest objects and arrays at most this deep; the args object
# itself is level 1. jsonb holds far deeper values, but every JSON decoder of the path (the
# worker's included) recurses once per level: deeper input is refused at enqueue.
MAX_JSON_DEPTH = 64
# run_at outside [EARLIEST_RUN_AT, now + LATEST_RUN_AT_AHEAD] is a mistake, not a plan.
EARLIEST_RUN_AT = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_RUN_AT_AHEAD = timedelta(days=366 * 100)
EXECUTOR_KINDS = frozenset({"shell", "http"})
ENQUEUE_OPTIONS = frozenset(
    {
        "queue",
        "priority",
        "run_at",
        "delay",
        "max_attempts",
        "timeout",
        "dedupe_key",
        "depends_on",
        "owner",
        "concurrency_key",
        "run_on_upstream_failure",
    }
)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_encoder = msgspec.json.Encoder()


class ArgsSpec(msgspec.Struct, frozen=True):
    """What a task's function accepts as a job's args (``args_spec`` of its catalog parameters)."""

    required: tuple[str, ...]
    names: frozenset[str] | None  # None: it takes **kwargs, so any name
    signature: str  # for messages: "(a, b=..., **kwargs)"


class TaskDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """Defaults a task gives its jobs (from the app's registry or the tasks catalog)."""

    queue: str = "default"
    priority: int = 0
    max_attempts: int = 5
    timeout: float | None = None
    encrypt: bool = False  # its jobs' payloads are stored encrypted (pgsched.crypto)
    accepts: ArgsSpec | None = None  # None: unknown, args are not checked

    @classmethod
    def from_catalog(cls, queue: str, options: dict[str, Any], parameters: list[dict[str, Any]] | None) -> TaskDefaults:
        """The defaults a row of ``pgsched.tasks`` records."""
        return cls(
            queue=queue,
            priority=options.get("priority", 0),
            max_attempts=options.get("max_attempts", 5),
            timeout=options.get("timeout"),
            encrypt=options.get("encrypt", False),
            accepts=args_spec(parameters),
        )


class UnknownTask(TaskDefaults, frozen=True, kw_only=True):
    """Stands for a task name nobody registered: ``known_task`` refuses it, suggesting ``near``."""

    near: tuple[str, ...] = ()


class NewJob(msgspec.Struct, kw_only=True):
    """A validated job, ready to insert: every value checked, args already encoded."""

    task: str
    args_json: str
    queue: str
    priority: int
    max_attempts: int
    run_at: datetime | None
    delay_seconds: float | None
    timeout: float | None
    dedupe_key: str | None
    depends_on: list[int]
    owner: str | None
    concurrency_key: str | None
    run_on_upstream_failure: bool
    workflow_id: uuid.UUID | None = None


def check_json_value(value: Any, field: str) -> None:
    """Refuse what JSON (or PostgreSQL's jsonb) cannot hold faithfully: NaN/Infinity, NUL characters, odd
    types, and nesting deeper than ``MAX_JSON_DEPTH``."""
    _check_json(value, field)


_SCALARS = (str, int, bool, type(None))


def _too_deep(field: str) -> ValidationError:
    return ValidationError(field, f"nests objects and arrays more than {MAX_JSON_DEPTH} levels deep")


def _check_json(root: Any, field: str) -> None:
    # Iterative, with its own stack: a value nested thousands of levels deep gets a ValidationError,
    # not a RecursionError. The path is only turned into text for an error: valid input (the common
    # case) pays nothing for it.
    stack: list[tuple[Any, tuple[Any, ...]]] = [(root, ())]
    while stack:
        item, path = stack.pop()
        kind = type(item)
        if kind is str:
            if "\x00" in item:
                raise ValidationError(_path(field, path), "text must not contain the NUL character (\\u0000)")
        elif kind is float:
            if not math.isfinite(item):
                raise ValidationError(_path(field, path), f"{item} is not a valid JSON number")
        elif kind is dict or isinstance(item, Mapping):
            if len(path) >= MAX_JSON_DEPTH:
                raise _too_deep(field)
            for key, sub in item.items():
                if type(key) is not str:
                    raise ValidationError(_path(field, path), f"object keys must be strings, not {type(key).__name__}")
                if "\x00" in key:
                    raise ValidationError(_path(field, path), "keys must not contain the NUL character (\\u0000)")
                if type(sub) not in _SCALARS or (type(sub) is str and "\x00" in sub):
                    stack.append((sub, (*path, key)))
        elif kind is list or kind is tuple:
            if len(path) >= MAX_JSON_DEPTH:
                raise _too_deep(field)
            for index, sub in enumerate(item):
                if type(sub) not in _SCALARS or (type(sub) is str and "\x00" in sub):
                    stack.append((sub, (*path, index)))
        elif not isinstance(item, _SCALARS) and not isinstance(item, float):
            raise ValidationError(
                _path(field, path), f"{type(item).__name__} is not JSON (use str, int, float, bool, None, list, dict)"
            )


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKETS = re.compile(r"[][{}]")


def loads_json(text: str, field: str) -> Any:
    """Parse JSON text given on the command line; too deep a nesting is refused before parsing (the
    parser recurses once per level) and invalid JSON is a ValidationError too."""
    depth = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise _too_deep(field)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(field, f"not valid JSON ({exc})") from None


def _path(field: str, path: tuple[Any, ...]) -> str:
    return field + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def encode_json_object(value: Any, field: str, max_bytes: int = ARGS_MAX_BYTES) -> str:
    """Validate a JSON object and return its encoding."""
    if type(value) is not dict and not isinstance(value, Mapping):
        raise ValidationError(field, f"must be a JSON object (a dict), not {type(value).__name__}")
    check_json_value(value, field)
    encoded = _encoder.encode(value)
    if len(encoded) > max_bytes:
        raise ValidationError(field, f"is {len(encoded):,} bytes encoded; the limit is {max_bytes:,}")
    return encoded.decode()


def check_name(value: Any, field: str, *, pattern: re.Pattern[str] | None = None, optional: bool = False) -> Any:
    """A non-empty text of at most NAME_MAX_LENGTH characters (matching ``pattern`` if given)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValidationError(field, f"must be text, not {type(value).__name__}")
    if not value:
        raise ValidationError(field, "must not be empty")
    if "\x00" in value:
        raise ValidationError(field, "must not contain the NUL character")
    if pattern is not None:
        if not pattern.match(value):
            raise ValidationError(
                field, "must be 1-100 characters of letters, digits and _ . : -, starting with a letter or digit"
            )
    elif len(value) > NAME_MAX_LENGTH:
        raise ValidationError(field, f"must be at most {NAME_MAX_LENGTH} characters")
    return value


def check_int(value: Any, field: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValidationError(field, f"must be {bounds}, got {value}")
    return value


def check_seconds(value: Any, field: str, *, allow_zero: bool) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(field, "must be a finite number of seconds or a timedelta")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValidationError(field, "must be greater than 0" if not allow_zero else "must not be negative")
    if value > LATEST_RUN_AT_AHEAD.total_seconds():
        raise ValidationError(field, "is more than 100 years")
    return float(value)


def check_run_at(value: Any) -> datetime:
    if not isinstance(value, datetime):
        raise ValidationError("run_at", f"must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError("run_at", "must be timezone-aware (a naive datetime is ambiguous)")
    if value < EARLIEST_RUN_AT:
        raise ValidationError("run_at", f"{value.isoformat()} is before 2000-01-01")
    if value > datetime.now(UTC) + LATEST_RUN_AT_AHEAD:
        raise ValidationError("run_at", f"{value.isoformat()} is more than 100 years ahead")
    return value


def check_dependencies(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValidationError("depends_on", "must be a list of job ids")
    ids: dict[int, None] = {}
    for item in value:
        job_id = getattr(item, "id", item)  # a Job is accepted for its id
        ids[check_int(job_id, "depends_on", 1, MAX_BIGINT)] = None
        if len(ids) > MAX_DEPENDENCIES:
            raise ValidationError("depends_on", f"at most {MAX_DEPENDENCIES} dependencies per job")
    return list(ids)


def check_executor_args(task: str, args: Mapping[str, Any]) -> None:
    """The shape of the built-in kinds' arguments (DESIGN §3, task kinds)."""
    if "timeout" in args:
        check_seconds(args["timeout"], "args.timeout", allow_zero=False)
    if task == "shell":
        cmd = args.get("cmd")
        if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
            raise ValidationError("args.cmd", "must be a non-empty list of strings (argv, no shell)")
    elif task == "http":
        url = args.get("url")
        if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+", url):
            raise ValidationError("args.url", "must be an http:// or https:// URL")
        method = args.get("method", "GET")
        if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
            raise ValidationError("args.method", f"must be one of {', '.join(sorted(HTTP_METHODS))}")


def new_job(
    task: str,
    args: Any,
    defaults: TaskDefaults,
    *,
    queue: Any = None,
    priority: Any = None,
    run_at: Any = None,
    delay: Any = None,
    max_attempts: Any = None,
    timeout: Any = None,
    dedupe_key: Any = None,
    depends_on: Any = None,
    owner: Any = None,
    concurrency_key: Any = None,
    run_on_upstream_failure: Any = False,
) -> NewJob:
    """Validate one job; options left None take ``defaults``. Raises ValidationError naming the field."""
    args = {} if args is None else args
    args_json = encode_json_object(args, "args")
    if task in EXECUTOR_KINDS:
        check_executor_args(task, args)
    if defaults.accepts is not None:
        check_task_args(task, args, defaults.accepts)
    if run_at is not None and delay is not None:
        raise ValidationError("delay", "give run_at or delay, not both")
    if not isinstance(run_on_upstream_failure, bool):
        raise ValidationError("run_on_upstream_failure", "must be true or false")
    # Defaults were checked when the task was registered (or come from the catalog, whose
    # values the table's constraints check again): only given options are checked here.
    return NewJob(
        task=task,
        args_json=args_json,
        queue=defaults.queue if queue is None else check_name(queue, "queue", pattern=QUEUE_PATTERN),
        priority=defaults.priority if priority is None else check_int(priority, "priority", *PRIORITY_RANGE),
        max_attempts=defaults.max_attempts
        if max_attempts is None
        else check_int(max_attempts, "max_attempts", 1, MAX_INTEGER),
        run_at=None if run_at is None else check_run_at(run_at),
        delay_seconds=None if delay is None else check_seconds(delay, "delay", allow_zero=True),
        timeout=check_seconds(timeout, "timeout", allow_zero=False) if timeout is not None else defaults.timeout,
        dedupe_key=check_name(dedupe_key, "dedupe_key", optional=True),
        depends_on=check_dependencies(depends_on),
        owner=check_name(owner, "owner", optional=True),
        concurrency_key=check_name(concurrency_key, "concurrency_key", optional=True),
        run_on_upstream_failure=run_on_upstream_failure,
    )


def known_task(defaults: dict[str, TaskDefaults], task: str) -> TaskDefaults:
    """The defaults of ``task``; ValidationError(task) when nobody registered it."""
    found = defaults.get(task)
    if found is None or isinstance(found, UnknownTask):
        near = found.near if isinstance(found, UnknownTask) else ()
        hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else ""
        raise ValidationError(
            "task", f"unknown task {task!r}: not registered in this app nor in the pgsched.tasks catalog{hint}"
        )
    return found


_VARIADIC = frozenset({"var_positional", "var_keyword"})


def args_spec(parameters: list[dict[str, Any]] | None) -> ArgsSpec | None:
    """What a function accepts, from the catalog's record of its parameters (``Task.parameters``).
    None (not checked) for a record without the parameters' kinds: written by SQL or an earlier pgsched."""
    if not parameters or any("kind" not in p for p in parameters):
        return None
    shown = [
        {"var_positional": "*", "var_keyword": "**"}.get(p["kind"], "")
        + p["name"]
        + ("" if p.get("required") or p["kind"] in _VARIADIC else "=...")
        for p in parameters
    ]
    return ArgsSpec(
        required=tuple(p["name"] for p in parameters if p.get("required")),
        names=None
        if any(p["kind"] == "var_keyword" for p in parameters)
        else frozenset(p["name"] for p in parameters if p["kind"] not in _VARIADIC),
        signature=f"({', '.join(shown)})",
    )


def check_task_args(task: str, args: Mapping[str, Any], accepts: ArgsSpec) -> None:
    """Refuse args the task's function cannot be called with, before its job burns every attempt on a
    TypeError: a required parameter missing, or a name it does not take (unless it takes ``**kwargs``)."""
    for name in accepts.required:
        if name not in args:
            raise ValidationError(f"args.{name}", f"required by task {task!r}, which takes {accepts.signature}")
    if accepts.names is not None and not accepts.names.issuperset(args):
        name = next(n for n in args if n not in accepts.names)
        near = difflib.get_close_matches(name, accepts.names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValidationError(
            f"args.{name}", f"task {task!r} takes no argument {name!r}{hint} (it takes {accepts.signature})"
        )


def check_options(options: Mapping[str, Any]) -> None:
    for key in options:
        if key not in ENQUEUE_OPTIONS:
            raise ValidationError(key, f"unknown enqueue option; valid options: {', '.join(sorted(ENQUEUE_OPTIONS))}")


# Named constraints of sql/ and the input field each one guards.
CONSTRAINT_FIELDS = {
    "jobs_state_valid": "state",
    "jobs_priority_range": "priority",
    "jobs_max_attempts_positive": "max_attempts",
    "jobs_attempts_nonnegative": "attempts",
    "jobs_task_length": "task",
    "jobs_queue_format": "queue",
    "jobs_args_object": "args",
    "jobs_args_size": "args",
    "jobs_args_encrypted": "args",
    "jobs_result_size": "result",
    "jobs_progress_size": "progress",
    "jobs_error_size": "error",
    "jobs_dedupe_key_length": "dedupe_key",
    "jobs_owner_length": "owner",
    "jobs_concurrency_key_length": "concurrency_key",
    "jobs_timeout_positive": "timeout",
    "jobs_run_at_range": "run_at",
    "jobs_args_depth": "args",
    "jobs_schedule_id_fkey": "schedule_id",
    "job_deps_not_self": "depends_on",
    "job_deps_depends_on_fkey": "depends_on",
    "job_deps_job_id_fkey": "depends_on",
    "job_deps_no_cycle": "depends_on",
    "job_deps_max_per_job": "depends_on",
    "queues_name_format": "queue",
}


def error_from_db(exc: psycopg.Error) -> Exception:
    """The pgsched error for a database error raised by one of our statements (or ``exc`` itself)."""
    diag = exc.diag
    constraint = diag.constraint_name or ""
    message = diag.message_primary or str(exc)
    if constraint == "jobs_dedupe_key_live":
        detail = diag.message_detail or ""
        existing = re.search(r"existing_id=(\d+)", detail)
        key = re.search(r"\(dedupe_key\)=\((.*)\) already exists", detail)
        quoted = re.search(r'dedupe_key "(.*)" already exists', message)
        dedupe_key = key.group(1) if key else quoted.group(1) if quoted else ""
        return DuplicateJobError(dedupe_key, int(existing.group(1)) if existing else None)
    if constraint in CONSTRAINT_FIELDS:
        return ValidationError(CONSTRAINT_FIELDS[constraint], message)
    if diag.sqlstate == "PGS04":
        found = re.search(r"job (\d+)", message)
        return JobNotFound(int(found.group(1)) if found else 0)
    if diag.sqlstate == "PGS09":
        return InvalidStateError(message)
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return PermissionDenied(message)
    if isinstance(exc, psycopg.errors.InvalidParameterValue) and diag.column_name:
        return ValidationError(diag.column_name, message)
    if isinstance(exc, (psycopg.errors.InvalidTextRepresentation, psycopg.errors.UntranslatableCharacter)):
        return ValidationError("args", message)
    if isinstance(
        exc, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName)
    ):
        return SchemaError(f"{message}: run `pgsched migrate`")
    return exc
