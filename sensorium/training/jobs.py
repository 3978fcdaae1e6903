"""Fine-tuning jobs: a queue that survives restarts, one runner, and the events clients watch.

Jobs and their events live in SQLite (one file, WAL journal), so a restart of the trainer loses
nothing: a job that was running when the process died is queued again at startup and resumes
from its last checkpoint, because its working folder (checkpoints) is keyed by the job id.
Events are numbered per job so a client that reconnects asks for what it missed.

The runner executes one job at a time by default: a fine-tuning run already uses every core
(or the GPU) it is given. What a job does is a callable (``Execute``), so the queue is tested
with fakes and the service supplies the real training.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from sensorium.errors import AlreadyExists, InvalidArgument, NotFound, SensoriumError, StorageFull, StorageReadOnly

logger = logging.getLogger(__name__)


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Job:
    id: str
    state: JobState
    spec_json: str
    spec_digest: str
    idempotency_key: str
    adapter_id: str
    created: str
    started: str = ""
    finished: str = ""
    step: int = 0
    total_steps: int = 0
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from_step: int = 0
    attempts: int = 0


@dataclass
class JobEvent:
    job_id: str
    seq: int
    kind: str
    state: JobState
    time: str
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float = 0.0
    learning_rate: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    eta_seconds: float = 0.0
    tokens_per_second: float = 0.0
    message: str = ""


EVENT_FIELDS = ("step", "total_steps", "epoch", "loss", "learning_rate", "metrics", "eta_seconds",
                "tokens_per_second", "message")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    spec_digest TEXT NOT NULL,
    idempotency_key TEXT,
    adapter_id TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL,
    started TEXT NOT NULL DEFAULT '',
    finished TEXT NOT NULL DEFAULT '',
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    metrics TEXT NOT NULL DEFAULT '{}',
    resumed_from_step INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs(idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


def _storage_error(exc: sqlite3.Error, path: Path) -> SensoriumError | None:
    """SQLite's own codes for a full or unwritable disk, as the errors every store raises for them."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code: SQLITE_FULL, not its extensions
    if code == sqlite3.SQLITE_FULL:
        return StorageFull(f"no space left on the job store ({path}); free space and retry")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM, sqlite3.SQLITE_CANTOPEN):
        return StorageReadOnly(f"the job store is read-only or not writable ({path}: {exc})")
    return None


class JobStore:
    """Jobs and events in one SQLite file; every change is one transaction.

    A change the disk refuses raises ``StorageFull`` or ``StorageReadOnly`` and changes nothing:
    SQLite rolls the transaction back, and every job and event stored before stays readable.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:  # SQLite has already rolled back after SQLITE_FULL
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if (error := _storage_error(exc, self.path)) is None:
                    raise
                raise error from exc
            self._changed.notify_all()

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(id=row["id"], state=JobState(row["state"]), spec_json=row["spec_json"],
                   spec_digest=row["spec_digest"], idempotency_key=row["idempotency_key"] or "",
                   adapter_id=row["adapter_id"], created=row["created"], started=row["started"],
                   finished=row["finished"], step=row["step"], total_steps=row["total_steps"], error=row["error"],
                   metrics=json.loads(row["metrics"]), resumed_from_step=row["resumed_from_step"],
                   attempts=row["attempts"])

    # ---- jobs --------------------------------------------------------------------------------

    def submit(self, spec_json: str, spec_digest: str, *, idempotency_key: str = "", adapter_id: str = "",
               total_steps: int = 0, adapter_taken: Callable[[str], bool] = lambda _: False) -> tuple[Job, bool]:
        """Queue a job; with a known key and the same spec, the existing job instead (created False)."""
        with self._tx() as db:
            if idempotency_key:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row["spec_digest"] != spec_digest:
                        raise AlreadyExists(f"idempotency key {idempotency_key!r} was used for job {row['id']} "
                                            "with a different spec")
                    return self._job(row), False
            job_id = uuid.uuid4().hex[:16]
            adapter_id = adapter_id or f"job-{job_id}"
            taken = db.execute("SELECT id FROM jobs WHERE adapter_id = ?", (adapter_id,)).fetchone()
            if taken is not None or adapter_taken(adapter_id):
                owner = f" by job {taken['id']}" if taken is not None else " in the adapter store"
                raise AlreadyExists(f"adapter id {adapter_id!r} is already taken{owner}")
            db.execute("INSERT INTO jobs (id, state, spec_json, spec_digest, idempotency_key, adapter_id, created, "
                       "total_steps) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, JobState.QUEUED.value, spec_json, spec_digest, idempotency_key or None, adapter_id,
                        now(), total_steps))
            self._append(db, job_id, "queued", JobState.QUEUED, {"total_steps": total_steps})
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()), True

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"unknown job {job_id!r}")
        return self._job(row)

    def list(self, states: Sequence[JobState] = (), limit: int = 100) -> list[Job]:
        query, args = "SELECT * FROM jobs", []
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
            args = [s.value for s in states]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY n DESC LIMIT ?", (*args, limit)).fetchall()
        return [self._job(r) for r in rows]

    def next_queued(self) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY n LIMIT 1",
                                   (JobState.QUEUED.value,)).fetchone()
        return None if row is None else self._job(row)

    def update(self, job_id: str, **fields: Any) -> Job:
        if "metrics" in fields:
            fields["metrics"] = json.dumps(fields["metrics"])
        if "state" in fields:
            fields["state"] = JobState(fields["state"]).value
        with self._tx() as db:
            sets = ", ".join(f"{k} = ?" for k in fields)
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def transition(self, job_id: str, kind: str, state: JobState, event: dict[str, Any] | None = None,
                   **fields: Any) -> Job:
        """Change a job and record the event that says so, in one transaction."""
        if "metrics" in fields:
            fields["metrics"] = json.dumps(fields["metrics"])
        with self._tx() as db:
            sets = ", ".join(f"{k} = ?" for k in ("state", *fields))
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (state.value, *fields.values(), job_id))
            self._append(db, job_id, kind, state, event or {})
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    # ---- events ------------------------------------------------------------------------------

    def _append(self, db: sqlite3.Connection, job_id: str, kind: str, state: JobState, data: dict[str, Any]) -> int:
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
        body = {k: data[k] for k in EVENT_FIELDS if k in data}
        body.update(kind=kind, state=state.value, time=now())
        db.execute("INSERT INTO events (job_id, seq, body) VALUES (?, ?, ?)", (job_id, seq, json.dumps(body)))
        return seq

    def record(self, job_id: str, kind: str, data: dict[str, Any], **fields: Any) -> int:
        """A progress event, and the job's progress fields with it."""
        with self._tx() as db:
            state = JobState(db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
            if fields:
                sets = ", ".join(f"{k} = ?" for k in fields)
                db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))
            return self._append(db, job_id, kind, state, data)

    def events(self, job_id: str, after_seq: int = 0, wait: float = 0.0) -> list[JobEvent]:
        """Events after ``after_seq``; with ``wait``, block up to that long for the first new one."""
        self.get(job_id)
        if not 0 <= after_seq < 2**63:  # SQLite integers are 64-bit signed; a client may send any uint64
            raise InvalidArgument(f"after_seq {after_seq} is out of range (0 .. 2^63 - 1)")
        deadline = time.monotonic() + wait
        with self._changed:
            while True:
                rows = self._db.execute("SELECT seq, body FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
                                        (job_id, after_seq)).fetchall()
                left = deadline - time.monotonic()
                if rows or left <= 0:
                    break
                self._changed.wait(left)
        out = []
        for row in rows:
            body = json.loads(row["body"])
            out.append(JobEvent(job_id=job_id, seq=row["seq"], kind=body.pop("kind"),
                                state=JobState(body.pop("state")), time=body.pop("time"), **body))
        return out


# (job, record event, should stop) -> final metrics, or None when it stopped early because
# ``should_stop`` said so (a cancellation or a shutdown); raises to fail the job.
Execute = Callable[[Job, Callable[[str, dict[str, Any]], None], Callable[[], bool]], dict[str, float] | None]


class _StoreUnwritable(Exception):
    """A job's progress could not be stored: the job store's fault, not the job's, so not a failure."""


class JobRunner:
    """Runs queued jobs one after another in a background thread."""

    def __init__(self, store: JobStore, execute: Execute, poll_seconds: float = 0.5) -> None:
        self.store = store
        self.execute = execute
        self.poll_seconds = poll_seconds
        self._cancel: set[str] = set()
        self._stranded: set[str] = set()  # left RUNNING by a job store that could not be written
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current: str | None = None

    def start(self) -> None:
        """Requeue what a previous process left running, then serve the queue."""
        for job in self.store.list([JobState.RUNNING], limit=1_000_000):
            self.store.transition(job.id, "requeued", JobState.QUEUED,
                                  {"message": "the trainer restarted; the job resumes from its last checkpoint"})
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the running job to stop at its next step (it stays RUNNING and resumes on restart)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def cancel(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job.state.final:
            raise InvalidArgument(f"job {job_id} already ended {job.state.value}")
        if job.state == JobState.QUEUED:
            return self.store.transition(job_id, "cancelled", JobState.CANCELLED, {"message": "cancelled while queued"},
                                         finished=now())
        self._cancel.add(job_id)  # the running execution sees it at its next step
        return job

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._requeue_stranded()
                job = self.store.next_queued()
                if job is None:
                    self._stop.wait(self.poll_seconds)
                    continue
                self._run(job)
            except (StorageFull, StorageReadOnly, _StoreUnwritable) as exc:
                # The job store refused a write (disk full, read-only): the runner must outlive that.
                # The job stays as last stored; one left RUNNING is requeued once the store takes
                # writes again, and resumes from its last checkpoint.
                logger.error("the job store cannot be written; retrying in %.1f s: %s", self.poll_seconds, exc)
                if self.current is not None:
                    self._stranded.add(self.current)
                self._stop.wait(self.poll_seconds)
            finally:
                self.current = None

    def _requeue_stranded(self) -> None:
        for job_id in list(self._stranded):
            if self.store.get(job_id).state == JobState.RUNNING:
                self.store.transition(job_id, "requeued", JobState.QUEUED, {
                    "message": "the job store could not be written; the job resumes from its last checkpoint"})
            self._stranded.discard(job_id)

    def _run(self, job: Job) -> None:
        self.current = job.id
        job = self.store.transition(job.id, "started", JobState.RUNNING, {"total_steps": job.total_steps},
                                    started=now(), attempts=job.attempts + 1)

        def record(kind: str, data: dict[str, Any]) -> None:
            fields = {k: int(data[k]) for k in ("step", "total_steps", "resumed_from_step") if k in data}
            try:
                self.store.record(job.id, kind, data, **fields)
            except (StorageFull, StorageReadOnly) as exc:
                raise _StoreUnwritable(str(exc)) from exc

        def should_stop() -> bool:
            return self._stop.is_set() or job.id in self._cancel

        try:
            metrics = self.execute(job, record, should_stop)
        except _StoreUnwritable:
            raise  # the loop keeps the job for when the store takes writes again
        except SensoriumError as exc:
            self._fail(job, str(exc))
        except Exception as exc:  # a job's failure must never take the runner down
            logger.exception("job %s failed", job.id)
            self._fail(job, f"{type(exc).__name__}: {exc}")
        else:
            if metrics is not None:
                self.store.transition(job.id, "finished", JobState.SUCCEEDED, {"metrics": metrics}, finished=now(),
                                      metrics=metrics)
            elif job.id in self._cancel:
                self.store.transition(job.id, "cancelled", JobState.CANCELLED, {"message": "cancelled while running"},
                                      finished=now())
            # else: stopped by a shutdown; left RUNNING, so the next start requeues and resumes it
        finally:
            self._cancel.discard(job.id)

    def _fail(self, job: Job, reason: str) -> None:
        self.store.transition(job.id, "failed", JobState.FAILED, {"message": reason}, finished=now(), error=reason)
