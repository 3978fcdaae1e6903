"""The job queue: persistence across restarts, idempotency, cancellation, failures, events."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sensorium.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from sensorium.training.jobs import Job, JobRunner, JobState, JobStore


def wait_for(store: JobStore, job_id: str, states: set[JobState], timeout: float = 10.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} stayed {store.get(job_id).state}")


def steps(n: int, gate: threading.Event | None = None, fail_at: int | None = None, delay: float = 0.0):
    """A fake execution of ``n`` steps that resumes from the last step it recorded."""

    def execute(job: Job, record, should_stop):
        start = job.step
        for step in range(start + 1, n + 1):
            if gate is not None:
                gate.wait()
            time.sleep(delay)
            if should_stop():
                return None
            if step == fail_at:
                raise FailedPrecondition("no data left after filtering")
            record("step", {"step": step, "total_steps": n, "loss": 1.0 / step})
        return {"validation_spearman": 0.5}

    return execute


def test_submit_is_idempotent_under_a_key(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, created = store.submit('{"a": 1}', "d1", idempotency_key="k")
    again, created_again = store.submit('{"a": 1}', "d1", idempotency_key="k")
    assert created and not created_again and again.id == job.id
    with pytest.raises(AlreadyExists, match="different spec"):
        store.submit('{"a": 2}', "d2", idempotency_key="k")
    other, _ = store.submit('{"a": 1}', "d1")
    assert other.id != job.id and len(store.list()) == 2
    with pytest.raises(AlreadyExists, match="adapter id"):
        store.submit('{"a": 1}', "d1", adapter_id=job.adapter_id)
    with pytest.raises(AlreadyExists, match="adapter store"):
        store.submit('{"a": 1}', "d1", adapter_id="mine", adapter_taken=lambda a: a == "mine")
    with pytest.raises(NotFound):
        store.get("nope")


def test_jobs_run_in_order_and_events_are_numbered(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    first, _ = store.submit("{}", "a")
    second, _ = store.submit("{}", "b")
    runner = JobRunner(store, steps(3), poll_seconds=0.01)
    runner.start()
    try:
        done = wait_for(store, second.id, {JobState.SUCCEEDED})
    finally:
        runner.stop(5)
    assert store.get(first.id).finished <= done.started
    events = store.events(first.id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.kind for e in events] == ["queued", "started", "step", "step", "step", "finished"]
    assert events[-1].metrics == {"validation_spearman": 0.5} and done.metrics == {"validation_spearman": 0.5}
    assert [e.seq for e in store.events(first.id, after_seq=4)] == [5, 6]


def test_a_failure_is_recorded_and_the_runner_goes_on(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    bad, _ = store.submit("{}", "a")
    runner = JobRunner(store, steps(3, fail_at=2), poll_seconds=0.01)
    runner.start()
    try:
        failed = wait_for(store, bad.id, {JobState.FAILED})
        assert failed.error == "no data left after filtering" and failed.step == 1
        runner.execute = steps(2)
        good, _ = store.submit("{}", "b")
        wait_for(store, good.id, {JobState.SUCCEEDED})
    finally:
        runner.stop(5)


def test_cancel_queued_and_running(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    gate = threading.Event()
    running, _ = store.submit("{}", "a")
    queued, _ = store.submit("{}", "b")
    runner = JobRunner(store, steps(100, gate), poll_seconds=0.01)
    runner.start()
    try:
        wait_for(store, running.id, {JobState.RUNNING})
        assert runner.cancel(queued.id).state == JobState.CANCELLED
        runner.cancel(running.id)
        gate.set()
        assert wait_for(store, running.id, {JobState.CANCELLED}).finished
        with pytest.raises(InvalidArgument, match="already ended"):
            runner.cancel(running.id)
    finally:
        runner.stop(5)


def test_a_job_left_running_resumes_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    gate = threading.Event()
    job, _ = store.submit("{}", "a")
    runner = JobRunner(store, steps(6, gate, delay=0.2), poll_seconds=0.01)
    runner.start()
    wait_for(store, job.id, {JobState.RUNNING})
    gate.set()
    while store.get(job.id).step < 2:
        time.sleep(0.001)
    runner.stop(5)  # as at SIGTERM: the job stays RUNNING
    store.close()

    reopened = JobStore(path)
    assert reopened.get(job.id).state == JobState.RUNNING
    runner = JobRunner(reopened, steps(6), poll_seconds=0.01)
    runner.start()
    try:
        done = wait_for(reopened, job.id, {JobState.SUCCEEDED})
    finally:
        runner.stop(5)
    assert done.attempts == 2 and done.step == 6
    kinds = [e.kind for e in reopened.events(job.id)]
    assert "requeued" in kinds and kinds.count("started") == 2
    recorded = [e.step for e in reopened.events(job.id) if e.kind == "step"]
    assert recorded == sorted(set(recorded)) and recorded[-1] == 6  # no step recorded twice


def test_watchers_wake_on_new_events(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit("{}", "a")
    got: list[int] = []

    def watch() -> None:
        got.extend(e.seq for e in store.events(job.id, after_seq=1, wait=5))

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.1)
    store.record(job.id, "step", {"step": 1})
    t.join(5)
    assert got == [2]
    assert store.events(job.id, after_seq=2, wait=0.05) == []
