from datetime import timedelta

import pytest
from example_tasks import digest, send_welcome, sign_up

from pgsched.testing import Drained


def test_sign_up_sends_a_welcome(pgsched_app, drain, assert_enqueued, refute_enqueued):
    sign_up.enqueue(user_id=7)
    assert_enqueued(task=sign_up, args={"user_id": 7})
    refute_enqueued(task=send_welcome)

    assert drain() == Drained(succeeded=2)  # sign_up, then the send_welcome it enqueued
    welcome = pgsched_app.get(2)  # ids start at 1 in every test
    assert (welcome.task, welcome.result) == ("send_welcome", "welcome, user 7")


def test_every_test_starts_with_no_jobs(enqueued_jobs, refute_enqueued):
    assert enqueued_jobs(state="succeeded") == []  # the two jobs of the test above are gone
    refute_enqueued()


def test_a_failed_send_is_retried_after_its_backoff(pgsched_app, drain, pgsched_clock):
    job = send_welcome.enqueue(user_id=-1)
    assert drain() == Drained(retried=1)  # scheduled again, 60 s from now
    assert drain() == Drained()  # a drain never moves the clock
    pgsched_clock.advance(seconds=61)
    assert drain() == Drained(retried=1)
    pgsched_clock.advance(seconds=61)
    assert drain() == Drained(failed=1)  # the third attempt was the last
    assert pgsched_app.get(job.id).attempts == 3


def test_a_delayed_welcome_waits_for_its_time(drain, pgsched_clock, assert_enqueued):
    send_welcome.with_options(delay=timedelta(minutes=10)).enqueue(user_id=8, locale="fr")
    assert_enqueued(task=send_welcome, args={"locale": "fr"}, state="scheduled", queue="emails")
    assert drain() == Drained()
    pgsched_clock.advance(minutes=10)
    assert drain() == Drained(succeeded=1)


def test_the_digest_runs_every_hour(run_scheduler, pgsched_clock, drain, assert_enqueued):
    run_scheduler()  # the schedule starts: its first slot is an hour away
    pgsched_clock.advance(hours=1)
    assert run_scheduler()["fired"] == 1
    assert_enqueued(task=digest, state="queued")
    assert drain() == Drained(succeeded=1)


@pytest.mark.anyio
async def test_async_code_drains_with_drain_async(pgsched_app, drain_async):
    job = await send_welcome.enqueue_async(user_id=9)
    assert await drain_async(queues="emails") == Drained(succeeded=1)
    assert (await pgsched_app.get_async(job.id)).state == "succeeded"
