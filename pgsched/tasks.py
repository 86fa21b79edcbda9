"""Tasks: Python functions registered with ``@app.task``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Generic, ParamSpec, Protocol, TypedDict, TypeVar

import msgspec

from .backoff import DEFAULT_BACKOFF, Backoff
from .errors import ValidationError
from .jobs import Job
from .validation import (
    EXECUTOR_KINDS,
    MAX_INTEGER,
    NAME_MAX_LENGTH,
    PRIORITY_RANGE,
    QUEUE_PATTERN,
    TaskDefaults,
    args_spec,
    check_int,
    check_name,
    check_seconds,
)

P = ParamSpec("P")
R = TypeVar("R")


class TaskApp(Protocol):
    """What a task uses of its ``App`` (``pgsched.client`` imports this module, so not the class)."""

    def enqueue(self, task: str, args: Mapping[str, Any] | None = None, **options: Any) -> Job: ...

    async def enqueue_async(self, task: str, args: Mapping[str, Any] | None = None, **options: Any) -> Job: ...


def _takes_context(fn: Callable[..., Any]) -> bool:
    """True when the first parameter is annotated ``Context`` (``pgsched.Context``): the worker passes it."""
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        return False
    annotation = params[0].annotation
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return name.rsplit(".", 1)[-1] == "Context"


class Task(Generic[P, R]):
    """A registered task. Call it to run the function here; ``enqueue`` to run it on a worker."""

    def __init__(
        self,
        app: TaskApp,
        fn: Callable[P, R],
        *,
        name: str,
        queue: str,
        priority: int,
        max_attempts: int,
        backoff: Backoff,
        timeout: float | None,
        max_per_key: int | None = None,
        encrypt: bool = False,
    ) -> None:
        if name in EXECUTOR_KINDS:
            raise ValidationError("name", f"{name!r} is a built-in executor kind; choose another task name")
        self.app = app
        self.fn = fn
        self.name = check_name(name, "name")
        self.backoff = backoff
        self.max_per_key = max_per_key
        self.is_async = inspect.iscoroutinefunction(fn)
        self.takes_context = _takes_context(fn)
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())[1 if self.takes_context else 0 :]
        self.signature = signature.replace(parameters=params)
        self.defaults = TaskDefaults(
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout=timeout,
            encrypt=encrypt,
            accepts=args_spec(self.parameters()),
        )
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.defaults.queue}>"

    def bind_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The job's ``args`` object for a call like ``task.enqueue(*args, **kwargs)``."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ValidationError("args", f"{self.name}: {exc}") from None
        out: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                raise ValidationError("args", f"{self.name}: *{name} cannot be passed to a job; use named arguments")
            else:
                out[name] = value
        return out

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Enqueue a job of this task with the task's default options."""
        return self.app.enqueue(self.name, self.bind_args(args, kwargs))

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """``enqueue`` for async code."""
        return await self.app.enqueue_async(self.name, self.bind_args(args, kwargs))

    def with_options(self, **options: Any) -> BoundTask[P, R]:
        """This task with enqueue options set, e.g. ``task.with_options(delay=60).enqueue(day=...)``."""
        return BoundTask(self, options)

    def parameters(self) -> list[dict[str, Any]]:
        """The function's parameters, as recorded in the tasks catalog (``kind``: positional_or_keyword,
        keyword_only, var_keyword, ...; enqueue checks a job's args against them)."""
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        return [
            {
                "name": p.name,
                "annotation": _annotation_name(p.annotation),
                "required": p.default is inspect.Parameter.empty and p.kind not in variadic,
                "kind": p.kind.name.lower(),
            }
            for p in self.signature.parameters.values()
        ]

    def catalog_options(self, *, runs: bool = True) -> dict[str, Any]:
        """The task's options as stored in ``pgsched.tasks.options``: its enqueue defaults and, when
        this app ``runs`` the task (a worker), the options that govern its execution (``backoff``, and
        ``max_per_key``, which the claim reads): an app that only enqueues it cannot lift a cap."""
        options: dict[str, Any] = {
            "priority": self.defaults.priority,
            "max_attempts": self.defaults.max_attempts,
            "timeout": self.defaults.timeout,
            # So that an app enqueueing this task by name encrypts its args too.
            "encrypt": self.defaults.encrypt,
        }
        if runs:
            options["backoff"] = msgspec.to_builtins(self.backoff)
            if self.max_per_key is not None:
                options["max_per_key"] = self.max_per_key
        return options


def _annotation_name(annotation: Any) -> str | None:
    if annotation is inspect.Parameter.empty:
        return None
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None)


class BoundTask(Generic[P, R]):
    """A task with enqueue options bound; made by ``Task.with_options``."""

    def __init__(self, task: Task[P, R], options: dict[str, Any]) -> None:
        self.task = task
        self.options = options

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        return self.task.app.enqueue(self.task.name, self.task.bind_args(args, kwargs), **self.options)

    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        return await self.task.app.enqueue_async(self.task.name, self.task.bind_args(args, kwargs), **self.options)


class TaskOptions(TypedDict, total=False):
    """The options of ``@app.task`` (and the task options of ``@app.periodic``)."""

    name: str | None
    queue: str
    priority: int
    max_attempts: int
    backoff: Backoff | None
    timeout: float | timedelta | None
    max_per_key: int | None
    encrypt: bool


def make_task(
    app: TaskApp,
    fn: Callable[P, R],
    *,
    name: str | None = None,
    queue: str = "default",
    priority: int = 0,
    max_attempts: int = 5,
    backoff: Backoff | None = None,
    timeout: float | timedelta | None = None,
    max_per_key: int | None = None,
    encrypt: bool = False,
) -> Task[P, R]:
    """Validate ``@app.task`` options and build the Task."""
    task_name = name if name is not None else getattr(fn, "__name__", "")
    if len(task_name) > NAME_MAX_LENGTH:
        raise ValidationError("name", f"must be at most {NAME_MAX_LENGTH} characters")
    if backoff is not None and not isinstance(backoff, Backoff):
        raise ValidationError("backoff", "must be a pgsched.Backoff (Backoff.exponential, .fixed or .linear)")
    if not isinstance(encrypt, bool):
        raise ValidationError("encrypt", "must be true or false")
    return Task(
        app,
        fn,
        name=task_name,
        queue=check_name(queue, "queue", pattern=QUEUE_PATTERN),
        priority=check_int(priority, "priority", *PRIORITY_RANGE),
        max_attempts=check_int(max_attempts, "max_attempts", 1, MAX_INTEGER),
        backoff=backoff or DEFAULT_BACKOFF,
        timeout=None if timeout is None else check_seconds(timeout, "timeout", allow_zero=False),
        max_per_key=None if max_per_key is None else check_int(max_per_key, "max_per_key", 1, MAX_INTEGER),
        encrypt=encrypt,
    )
