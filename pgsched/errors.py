"""The errors pgsched raises. One hierarchy, so callers can catch ``PgschedError``."""

from __future__ import annotations


class PgschedError(Exception):
    """Base class of every error pgsched raises on purpose."""


class ValidationError(PgschedError, ValueError):
    """Bad input. ``field`` names the offending field; nothing was written."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class DuplicateJobError(ValidationError):
    """A live job with the same ``dedupe_key`` exists; ``existing_id`` is its id (None if unknown).
    In a bulk enqueue, ``field`` names the item (``jobs[3].dedupe_key``) and ``where`` says which
    job holds the key (another item of the batch, or a live job)."""

    def __init__(
        self, dedupe_key: str, existing_id: int | None, *, field: str = "dedupe_key", where: str | None = None
    ) -> None:
        if where is None:
            where = "a live job" + (f" (job {existing_id})" if existing_id is not None else "")
        super().__init__(field, f"dedupe_key {dedupe_key!r} is already held by {where}")
        self.dedupe_key = dedupe_key
        self.existing_id = existing_id


class JobNotFound(PgschedError, LookupError):
    """No job has this id."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} does not exist")
        self.job_id = job_id


class InvalidStateError(PgschedError):
    """The job is in a state that does not allow the operation (for example retrying a running job)."""


class PermissionDenied(PgschedError):
    """The database role may not do this (for example an enqueuer creating a shell job)."""


class ConfigError(PgschedError):
    """A setting has a bad value; the message names the option."""


class SchemaError(PgschedError):
    """The database schema is missing, outdated, newer than this code, or was edited."""


class EncryptionError(PgschedError):
    """An encrypted payload cannot be read."""


class MissingKeyError(EncryptionError):
    """The envelope names a key id this process has no key for (PGSCHED_ENCRYPTION_KEYS)."""

    def __init__(self, kid: str) -> None:
        super().__init__(f"encryption key {kid!r} is not configured")
        self.kid = kid


class DecryptionError(EncryptionError):
    """The envelope fails authentication: tampered with, moved from another field, or a wrong key."""

    def __init__(self, field: str, kid: str | None) -> None:
        key = f" with key {kid!r}" if kid else ""
        super().__init__(f"{field}: the encrypted value cannot be decrypted{key} (tampered with, or moved)")
        self.field = field
        self.kid = kid


class UnservedQueueWarning(UserWarning):
    """A job was enqueued to a queue no live worker claims from: it waits (``unroutable`` in
    ``queue_stats``) until one does. Warned once per queue and process."""


class DatabaseUnreachable(PgschedError, ConnectionError):
    """The database could not be reached at start-up, within ``wait_for_db`` seconds."""


class TooManyConnections(DatabaseUnreachable):
    """PostgreSQL refused a new connection because ``max_connections`` is used up."""

    def __init__(self) -> None:
        super().__init__(TOO_MANY_CONNECTIONS)


TOO_MANY_CONNECTIONS = (
    "PostgreSQL refused the connection: too many clients already (max_connections reached); "
    "close idle sessions (pg_stat_activity shows them), lower pool sizes and --concurrency, or raise "
    "max_connections; it works again as soon as connections are free"
)
