"""Encrypted payloads on the client side: which jobs an app stores encrypted, sealing their args
before they are written, and reading them back.

A job's args are encrypted when its task says ``encrypt=True`` or its queue's ``pgsched.queues``
row says ``encrypt`` (read when the app connects; the database refuses plaintext there too, see
docs/architecture.md, "Encrypted payloads"). The worker's side is ``pgsched.worker.run_encryption``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import msgspec

from .crypto import Keyring, is_envelope
from .errors import EncryptionError, ValidationError
from .jobs import Job
from .queues import QueueSettings
from .schedules import Schedule
from .validation import ARGS_MAX_BYTES, NewJob, TaskDefaults


class Payloads:
    """One app's encrypted payloads; ``keyring`` gives its keys (None when none are configured)."""

    def __init__(self, keyring: Callable[[], Keyring | None]) -> None:
        self._keyring = keyring
        self.encrypted_queues: frozenset[str] = frozenset()

    def keyring_for(self, task: str, queue: str, encrypt: bool) -> Keyring | None:
        """The keyring that encrypts args of ``task`` in ``queue``; None when they are stored in clear."""
        if not (encrypt or queue in self.encrypted_queues):
            return None
        keyring = self._keyring()
        if keyring is None:
            where = f"task {task!r}" if encrypt else f"queue {queue!r}"
            raise ValidationError(
                "args", f"{where} stores encrypted payloads, but no key is configured (set PGSCHED_ENCRYPTION_KEYS)"
            )
        return keyring

    def seal(self, job: NewJob, defaults: TaskDefaults) -> NewJob:
        """Encrypt a validated job's args when its task or its queue asks for it."""
        keyring = self.keyring_for(job.task, job.queue, defaults.encrypt)
        if keyring is not None:
            job.args_json = keyring.encrypt_encoded(job.args_json, "args", (job.task, job.queue))
            if len(job.args_json) > ARGS_MAX_BYTES:
                raise ValidationError(
                    "args", f"is {len(job.args_json):,} bytes encrypted; the limit is {ARGS_MAX_BYTES:,}"
                )
        return job

    def seal_schedule(self, schedule: Schedule, defaults: TaskDefaults) -> Schedule:
        """A schedule whose args template is encrypted when its jobs' would be: the materializer then
        copies the envelope into each job and needs no key."""
        keyring = self.keyring_for(schedule.task, schedule.queue, defaults.encrypt)
        if keyring is None:
            return schedule
        return msgspec.structs.replace(
            schedule, args=keyring.encrypt_json(schedule.args, "args", (schedule.task, schedule.queue))
        )

    def readable(self, job: Job) -> Job:
        """The job with its payloads decrypted where this app can (else left as envelopes)."""
        keyring = self._keyring()
        if keyring is None:
            return job
        for field in ("args", "result", "progress", "error"):
            value = getattr(job, field)
            if is_envelope(value):
                # Left sealed: a key this app lacks, or an envelope that fails authentication (moved
                # from another job's task or queue, tampered with): the job stays readable.
                with contextlib.suppress(EncryptionError):
                    setattr(job, field, keyring.decrypt(value, field, (job.task, job.queue)))
        return job

    def note(self, settings: QueueSettings) -> QueueSettings:
        """This app's own enqueues follow its change of a queue's ``encrypt`` at once (other
        apps read it when they connect)."""
        if settings.encrypt:
            self.encrypted_queues |= {settings.name}
        else:
            self.encrypted_queues -= {settings.name}
        return settings


def readable_text(text: str | None, field: str, scope: tuple[str, str], keyring: Keyring | None) -> str | None:
    """A text column of an encrypted job (``scope``: its task and queue), decrypted with the
    configured keys (PGSCHED_ENCRYPTION_KEYS), else "(encrypted)"."""
    if text is None or not is_envelope(text):
        return text
    if keyring is not None:
        try:
            return keyring.decrypt_text(text, field, scope)
        except EncryptionError:
            pass
    return "(encrypted)"
