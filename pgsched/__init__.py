"""pgsched: a distributed task scheduler whose whole state lives in PostgreSQL."""

from .backoff import Backoff
from .client import App
from .config import Settings, load_settings
from .context import Context
from .cron import next_fire_times
from .errors import (
    ConfigError,
    DuplicateJobError,
    InvalidStateError,
    JobNotFound,
    PermissionDenied,
    PgschedError,
    SchemaError,
    UnservedQueueWarning,
    ValidationError,
)
from .jobs import Job, JobSpec
from .queues import QueueSettings
from .task_control import Cancel, Retry, Snooze
from .tasks import Task

__version__ = "0.1.0"

__all__ = [
    "App",
    "Backoff",
    "Cancel",
    "ConfigError",
    "Context",
    "DuplicateJobError",
    "InvalidStateError",
    "Job",
    "JobNotFound",
    "JobSpec",
    "PermissionDenied",
    "PgschedError",
    "QueueSettings",
    "Retry",
    "SchemaError",
    "Settings",
    "Snooze",
    "Task",
    "UnservedQueueWarning",
    "ValidationError",
    "load_settings",
    "next_fire_times",
]
