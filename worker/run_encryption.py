"""Encrypted payloads on the worker's side: opening a job's args and checkpoint before it runs,
and sealing what its run writes (the client's side is ``pgsched.encryption``)."""

from __future__ import annotations

import contextlib

from pgsched.client import App
from pgsched.context import Context
from pgsched.crypto import Keyring, is_envelope, kid_of
from pgsched.errors import EncryptionError, MissingKeyError
from pgsched.jobs import Job
from pgsched.validation import ARGS_MAX_BYTES

from .outcomes import Outcome, failure

# Texts grow by a third when encrypted; the error columns hold at most 64 KiB.
ENCRYPTED_ERROR_MAX_BYTES = 40_000
# A job sealed with a key this worker lacks waits this long for a worker that has it.
KEY_WAIT_SECONDS = 30.0


class KeyNotHere(EncryptionError):
    """The job is sealed with a key this worker lacks; another worker may have it (a staged key
    rollout), so the job is left for one instead of failed."""


def open_payloads(app: App, job: Job, ctx: Context) -> Keyring | None:
    """Decrypt an encrypted job's args and checkpoint in place, and return the keyring that
    encrypts what its run writes; None for a job stored in clear."""
    task = app.tasks.get(job.task)
    declared = (task is not None and task.defaults.encrypt) or job.queue in app.encrypted_queues
    if not (declared or is_envelope(job.args)):
        return None
    keyring = app.keyring
    if keyring is None and not is_envelope(job.args):
        raise EncryptionError("this job is stored encrypted, but no encryption key is configured on this worker")
    try:
        if keyring is None:
            raise MissingKeyError(str(kid_of(job.args)))
        job.args = keyring.decrypt(job.args, "args", (job.task, job.queue))
        job.progress = keyring.decrypt(job.progress, "progress", (job.task, job.queue))
    except MissingKeyError as exc:
        raise KeyNotHere(f"encryption key {exc.kid!r} is not configured on this worker") from None
    for job_id, result in ctx.dependency_results.items():
        if not is_envelope(result):
            continue
        # The claim adds the dependency's own task and queue (from its row) to its sealed result.
        scope = (str(result.get("task")), str(result.get("queue")))
        with contextlib.suppress(MissingKeyError):  # a dependency encrypted with a key we lack stays sealed
            ctx.dependency_results[job_id] = keyring.decrypt(result, "result", scope)
    return keyring


def sealed(outcome: Outcome, keyring: Keyring) -> Outcome:
    """The outcome of an encrypted job with its result and error encrypted. A result too large
    once encrypted fails the attempt for good, as a too large plain one does."""
    if outcome.result is not None:
        scope = (outcome.job.task, outcome.job.queue)
        result = keyring.encrypt_encoded(outcome.result, "result", scope)
        if len(result) > ARGS_MAX_BYTES:
            error = f"result is {len(result):,} bytes encrypted; the limit is {ARGS_MAX_BYTES:,}"
            outcome = failure(outcome.job, outcome.started_at, "failed", error, final=True)
        else:
            outcome.result = result
    if outcome.error is not None:
        # Keep the end of a long traceback: it names the exception.
        clipped = outcome.error.encode()[-ENCRYPTED_ERROR_MAX_BYTES:].decode(errors="ignore")
        outcome.error = keyring.encrypt_text(clipped, "error", (outcome.job.task, outcome.job.queue))
    return outcome
