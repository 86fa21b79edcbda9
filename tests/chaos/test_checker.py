"""The history checker on hand-made histories: a clean one passes, and each verdict fires on the
history that breaks its promise (and only there)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from .checker import Ack, HistoryEvent, JobRow, Observed, Report, RunRow, check, recovery_times

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 1, tzinfo=UTC)
W1, W2 = "w-1", "w-2"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class History:
    """A small history builder: enqueue, run (start/end events and the runs row), rescue."""

    def __init__(self) -> None:
        self.observed = Observed([], [], [], [])
        self.jobs: dict[int, JobRow] = {}
        self.count = 0

    def enqueue(self, job_id: int, outcome: str = "ack", queue: str = "default") -> None:
        self.observed.acks.append(Ack(f"k{job_id}", job_id if outcome != "unknown" else None, outcome))
        self.jobs[job_id] = JobRow(job_id, f"k{job_id}", queue, "queued", 0, 5, None, None)

    def execute(
        self,
        job_id: int,
        attempt: int,
        start: float,
        end: float | None,
        *,
        worker: str = W1,
        write: str | None = "succeeded",
    ) -> str:
        """An execution; ``write``: the outcome the database accepted for it (None: nothing written)."""
        self.count += 1
        execution = f"e{self.count}"
        key = self.jobs[job_id].key if job_id in self.jobs else f"k{job_id}"
        self.observed.history.append(HistoryEvent(execution, job_id, key, attempt, worker, 1, "start", at(start)))
        if end is not None:
            self.observed.history.append(HistoryEvent(execution, job_id, key, attempt, worker, 1, "end", at(end)))
        if write is not None and end is not None:
            queue = self.jobs[job_id].queue if job_id in self.jobs else "default"
            self.observed.runs.append(RunRow(job_id, attempt, queue, worker, write, at(start), at(end)))
            if job_id in self.jobs and write == "succeeded":
                self.jobs[job_id] = self.jobs[job_id]._replace(
                    state="succeeded", attempts=attempt, result_exec=execution, finished_at=at(end)
                )
        return execution

    def rescue(self, job_id: int, attempt: int, start: float, when: float, worker: str = W1) -> None:
        queue = self.jobs[job_id].queue
        self.observed.runs.append(RunRow(job_id, attempt, queue, worker, "lease_expired", at(start), at(when)))

    def check(self, **options: object) -> Report:
        self.observed.jobs = list(self.jobs.values())
        return check(self.observed, **options)  # type: ignore[arg-type]


def fired(report: Report) -> set[str]:
    return {name for name in Report.VERDICTS if getattr(report, name)}


def clean() -> History:
    h = History()
    for job_id in (1, 2, 3):
        h.enqueue(job_id)
    h.execute(1, 1, 0, 1)
    # Job 2: its first worker vanished, the lease expired, it ran again elsewhere (explained).
    h.execute(2, 1, 0, None, write=None)
    h.rescue(2, 1, 0, 3)
    h.execute(2, 2, 4, 5, worker=W2)
    # Job 3: failed once, retried.
    h.execute(3, 1, 0, 1, write="failed")
    h.execute(3, 2, 2, 3)
    return h


def test_a_clean_history_passes_with_its_explained_duplicate_and_retry() -> None:
    report = clean().check()
    assert report.ok, report
    assert report.duplicated_explained == [2]
    assert report.retries == 1
    assert report.executions == 5


def test_an_acknowledged_job_never_finished_is_lost() -> None:
    h = clean()
    h.enqueue(4)
    assert h.check().lost == [4]
    assert fired(h.check()) == {"lost"}


def test_an_acknowledged_job_missing_or_succeeded_without_an_execution_is_lost() -> None:
    h = clean()
    h.enqueue(4)
    h.enqueue(5)
    del h.jobs[4]
    h.jobs[5] = h.jobs[5]._replace(state="succeeded", finished_at=at(1))
    assert h.check().lost == [4, 5]


def test_an_unknown_outcome_enqueue_may_be_absent_or_present_once() -> None:
    h = clean()
    h.enqueue(4, outcome="unknown")
    del h.jobs[4]
    assert h.check().ok
    h.enqueue(5, outcome="unknown")
    h.execute(5, 1, 0, 1)
    assert h.check().ok


def test_an_unknown_outcome_enqueue_present_twice_is_reported() -> None:
    h = clean()
    h.enqueue(4, outcome="unknown")
    h.jobs[5] = h.jobs[4]._replace(id=5)
    assert h.check().enqueued_twice == ["k4"]


def test_executions_of_a_job_never_enqueued_or_rolled_back_are_unexpected() -> None:
    h = clean()
    h.execute(9, 1, 0, 1, write=None)
    h.enqueue(4, outcome="rolled_back")
    h.execute(4, 1, 0, 1)
    h.jobs[4] = h.jobs[4]._replace(state="succeeded")
    report = h.check()
    assert report.unexpected == [4, 9]
    assert fired(report) == {"unexpected"}


def test_a_second_execution_with_no_lease_expiry_before_it_is_unexplained() -> None:
    h = clean()
    h.enqueue(4)
    h.execute(4, 1, 0, 2, write=None)
    h.execute(4, 2, 1, 3, worker=W2)
    report = h.check()
    assert report.duplicated_unexplained == [4]
    assert fired(report) == {"duplicated_unexplained"}


def test_a_lease_expiry_after_the_second_start_does_not_explain_it() -> None:
    h = clean()
    h.enqueue(4)
    h.execute(4, 1, 0, None, write=None)
    h.execute(4, 2, 1, 3, worker=W2)
    h.rescue(4, 1, 0, 2)
    assert h.check().duplicated_unexplained == [4]


def test_two_executions_of_the_same_attempt_are_unexplained_even_after_a_rescue() -> None:
    h = clean()
    h.enqueue(4)
    h.execute(4, 1, 0, None, write=None)
    h.rescue(4, 1, 0, 2)
    h.execute(4, 1, 3, 4, worker=W2)
    assert h.check().duplicated_unexplained == [4]


def test_an_execution_after_the_job_finished_is_a_rerun() -> None:
    h = clean()
    h.execute(1, 2, 5, 6, write=None)
    report = h.check()
    assert report.rerun_after_finish == [1]
    assert "rerun_after_finish" in fired(report)


def test_a_later_attempt_than_a_succeeded_one_is_a_rerun_whatever_the_clocks() -> None:
    h = clean()
    h.jobs[1] = h.jobs[1]._replace(finished_at=at(10))  # the finish written again, later
    h.execute(1, 2, 5, 6, write=None)
    assert h.check().rerun_after_finish == [1]


def test_an_execution_of_the_same_attempt_after_the_finish_was_written_is_a_rerun() -> None:
    h = clean()
    h.execute(1, 1, 1.5, 2, write=None)  # job 1's finish (attempt 1) was written at 1 s
    assert h.check().rerun_after_finish == [1]


def test_an_outcome_accepted_from_a_rescued_attempt_is_a_fenced_write_accepted() -> None:
    h = clean()
    h.enqueue(4)
    h.execute(4, 1, 0, 5, write="succeeded")  # written although...
    h.rescue(4, 1, 0, 3)  # ...the attempt had been taken back
    report = h.check()
    assert report.fenced_accepted == [4]


def test_a_result_from_an_earlier_attempt_is_a_fenced_write_accepted() -> None:
    h = clean()
    h.enqueue(4)
    stale = h.execute(4, 1, 0, None, write=None)
    h.rescue(4, 1, 0, 2)
    h.execute(4, 2, 3, 4, worker=W2)
    h.jobs[4] = h.jobs[4]._replace(result_exec=stale)
    h.observed.history.append(HistoryEvent(stale, 4, "k4", 1, W1, 1, "end", at(5)))
    assert h.check().fenced_accepted == [4]


def test_a_fenced_runs_row_is_not_an_accepted_write() -> None:
    h = clean()
    h.enqueue(4)
    h.execute(4, 1, 0, 5, write="fenced")
    h.rescue(4, 1, 0, 3)
    h.execute(4, 2, 4, 6, worker=W2)
    assert h.check().ok


def test_a_schedules_jobs_are_not_unexpected_and_share_their_args() -> None:
    h = clean()
    for job_id, slot in ((10, 60), (11, 120)):
        h.jobs[job_id] = JobRow(job_id, "tick", "default", "succeeded", 1, 5, None, at(slot + 1), 7, at(slot))
        h.execute(job_id, 1, slot, slot + 1, write=None)
    assert h.check().ok


def test_schedule_slots_fired_twice_or_missing() -> None:
    h = clean()
    h.jobs[10] = JobRow(10, None, "default", "succeeded", 1, 5, None, at(1), 7, at(60))
    h.jobs[11] = JobRow(11, None, "default", "succeeded", 1, 5, None, at(1), 7, at(60))
    h.jobs[12] = JobRow(12, None, "default", "succeeded", 1, 5, None, at(1), 7, at(120))
    report = h.check(expected_slots={7: [at(60), at(120), at(180)]})
    assert report.slots_duplicated == [(7, at(60))]
    assert report.slots_missing == [(7, at(180))]
    assert h.check(expected_slots={7: [at(60), at(120)]}).slots_missing == []


def test_a_cap_exceeded_from_the_runs_intervals() -> None:
    h = History()
    for job_id in (1, 2, 3):
        h.enqueue(job_id, queue="capped")
    h.execute(1, 1, 0, 2)
    h.execute(2, 1, 1, 3)
    h.execute(3, 1, 2, 4)  # starts when job 1 ends: never three at once
    assert h.check(caps={"capped": 2}).ok
    assert h.check(caps={"capped": 2}).peaks == {"capped": 2}
    assert h.check(caps={"capped": 1}).cap_exceeded == {"capped": 2}


def test_a_rate_exceeded_from_the_runs_starts() -> None:
    h = History()
    for job_id in (1, 2, 3):
        h.enqueue(job_id, queue="rated")
    for job_id, start in ((1, 0.0), (2, 0.5), (3, 1.0)):
        h.execute(job_id, 1, start, start + 0.1)
    assert h.check(rates={"rated": (2, timedelta(seconds=1))}).ok  # 1.0 is outside [0, 1)
    assert h.check(rates={"rated": (2, timedelta(seconds=1.5))}).rate_exceeded == {"rated": 3}


def test_late_stop_measures_how_long_a_rescued_attempt_ran_on() -> None:
    h = clean()
    h.enqueue(4)
    h.execute(4, 1, 0, 6, write="fenced")
    h.rescue(4, 1, 0, 3.5)
    h.execute(4, 2, 4, 5, worker=W2)
    assert h.check().late_stop == [2.5]


def test_recovery_times_after_each_fault() -> None:
    # 10 completions a second, none for two seconds after the fault at 5 s, then 10 a second again.
    ends = [at(i / 10) for i in range(50)] + [at(7 + i / 10) for i in range(30)]
    assert recovery_times(ends, [at(5)], clean_rate=None) == [2.0]
    assert recovery_times(ends, [at(5)], clean_rate=100.0) == [None]


def test_recovery_against_the_rate_just_before_each_fault() -> None:
    # 20 a second until 5 s, then the machine allows 10 a second; a fault at 8 s stops completions
    # for a second. Against the first rate nothing after 5 s recovers; against the rate of the
    # second before each fault, the fault at 8 s is back after 1 s.
    ends = [at(i / 20) for i in range(100)] + [at(5 + i / 10) for i in range(30)]
    ends += [at(9 + i / 10) for i in range(30)]
    assert recovery_times(ends, [at(8)], clean_rate=20.0) == [None]
    assert recovery_times(ends, [at(8)], clean_rate=None, local=True) == [1.0]
    assert recovery_times(ends, [at(3), at(8)], clean_rate=None, local=True) == [0.0, 1.0]
    # A burst of 40 a second before a fault does not raise the bar above the clean rate of 20.
    burst = [at(i / 20) for i in range(100)] + [at(5 + i / 40) for i in range(40)] + [at(7 + i / 20) for i in range(40)]
    assert recovery_times(burst, [at(6)], clean_rate=20.0, local=True) == [1.0]
    assert recovery_times(burst, [at(6)], clean_rate=None, local=True) == [None]
    # After a kill, the clock starts when the restarted worker was back (at 8.5 s): back 0.5 s later.
    assert recovery_times(ends, [at(8)], clean_rate=None, local=True, restarts=[at(8.5)]) == [0.5]
