"""Fault injection: what the services survive, shown by doing it to them.

Four faults, each through real service processes where a process boundary matters:

1. the trainer SIGKILLed mid-job at a random step: the job resumes from its last checkpoint and
   finishes, and no adapter is ever listed before it is complete;
2. the extractor SIGKILLed during Extract traffic, and its vector cache damaged in the ways a
   crash or a torn write leaves it: the cache loads or is set aside, and no wrong vector is served;
3. clients that drop a stream, cancel a call or let its deadline pass: the server stops the work
   at a batch boundary and frees the worker for the next request;
4. a full or read-only disk under the table store, the adapter and job stores and the vector
   cache: a clear error naming the store, no temporary files left, the stored data intact.

Every test records what it survived under the ``faults`` section of the reliability figures.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

import reliability
from conftest import ServiceProcess, extractor_env
from sensorium.client import ExtractorClient, TrainerClient
from sensorium.experiment.launcher import free_port
from sensorium.models.adapters import AdapterStore
from sensorium.training import checkpoint as ckpt
from sensorium.training.jobs import JobState, JobStore
from sensorium.v1 import extractor_pb2 as epb
from sensorium.v1 import extractor_pb2_grpc as epb_grpc
from sensorium.v1 import trainer_pb2 as tpb
from test_trainer_service import SPEC, trainer_env

T = TypeVar("T")


# ---- helpers --------------------------------------------------------------------------------
def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def rpc_counts(metrics_port: int, method: str) -> dict[str, float]:
    """``sensorium_rpc_requests_total`` of one method, by status code, from the Prometheus exporter."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sensorium_rpc_requests_total" and sample.labels["method"] == method:
                counts[sample.labels["code"]] = sample.value
    return counts


def cancelled_since(metrics_port: int, method: str, before: float) -> float:
    """RPCs of ``method`` counted CANCELLED (the client went away or its deadline passed), less ``before``."""
    return rpc_counts(metrics_port, method).get("CANCELLED", 0) - before


def log_entries(log: Path, **match: Any) -> list[dict[str, Any]]:
    """The JSON log lines of a service whose fields equal ``match``."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # progress bars of model loading, not log records
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in match.items()):
            out.append(entry)
    return out


def served_after_refusals(call: Callable[[], T], timeout: float = 60.0) -> tuple[T, float, int]:
    """``call`` retried while the service says it is busy: (reply, seconds until served, refusals)."""
    started, refusals = time.monotonic(), 0
    while True:
        try:
            return call(), time.monotonic() - started, refusals
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() - started > timeout:
                raise
            refusals += 1
            time.sleep(0.02)


# ---- 1. the trainer killed mid-job -----------------------------------------------------------
KILL_SEED = int(time.time()) if reliability.HEAVY else 20261124  # heavy runs kill at a new step each time
TOTAL_STEPS, CHECKPOINT_EVERY = 30, 5
KILL_SPEC = {**SPEC, "optim": {**SPEC["optim"], "max_steps": TOTAL_STEPS},
             "eval": {"every_steps": 15, "checkpoint_every_steps": CHECKPOINT_EVERY}}


class AdapterWatcher:
    """Lists the adapter store (directly, and through the extractor) as fast as it can in a thread.

    Every time ``adapter_id`` is listed its manifest is verified on the spot (every file rehashed):
    an entry listed before it was complete would fail that, or show another digest.
    """

    def __init__(self, store: AdapterStore, extractor: epb_grpc.ExtractorStub, adapter_id: str) -> None:
        self.store, self.extractor, self.adapter_id = store, extractor, adapter_id
        self.polls = self.extractor_polls = self.sightings = self.partial = 0
        self.digests: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if any(m.id == self.adapter_id for m in self.store.list()):
                self.sightings += 1
                try:
                    self.digests.add(self.store.manifest(self.adapter_id, verify=True).digest)
                except Exception:  # a listed entry that does not verify is exactly the failure looked for
                    self.partial += 1
            self.polls += 1
            self._stop.wait(0.01)  # a publish takes milliseconds; leave the cores to the trainer
            if self.polls % 10 == 0:
                listed = self.extractor.ListAdapters(epb.ListAdaptersRequest(model="tiny"), timeout=30).adapters
                self.digests.update(a.digest for a in listed if a.id == self.adapter_id)
                self.extractor_polls += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()


def test_trainer_killed_at_a_random_step_resumes_and_never_lists_a_partial_adapter(
        tmp_path: Path, tiny_model_path: Path) -> None:
    """SIGKILL (no chance to clean up) at a seeded random step after the first checkpoint; the
    restarted trainer resumes the job from the newest checkpoint that verifies and publishes the
    adapter, which the extractor then serves. Meanwhile the store is listed continuously: the
    adapter must not appear before it is complete, nor after the kill, nor may the leftover of a
    publish killed half way (a hidden temporary folder) ever be listed."""
    kill_step = random.Random(KILL_SEED).randrange(CHECKPOINT_EVERY + 1, TOTAL_STEPS)
    adapters = tmp_path / "adapters"
    env = trainer_env(tiny_model_path, adapters)
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(2) as starting:
        extractor_started = starting.submit(ServiceProcess, "extractor", tmp_path, {
            **extractor_env(tiny_model_path), "SENSORIUM_EXTRACTOR_ADAPTERS_DIR": str(adapters)})
        trainer_started = starting.submit(ServiceProcess, "trainer", tmp_path, env)
        for started in (extractor_started, trainer_started):
            stack.callback(lambda f=started: f.exception() is None and f.result().stop())
        extractor, trainer = extractor_started.result(), trainer_started.result()
        ex = stack.enter_context(ExtractorClient(extractor.address))
        watcher = AdapterWatcher(AdapterStore(adapters), epb_grpc.ExtractorStub(ex.channel), "tiny-tuned")
        stack.callback(watcher.stop)

        with TrainerClient(trainer.address) as client:
            reply = client.submit(KILL_SPEC, idempotency_key="run-1", adapter_id="tiny-tuned")
            job = reply.job
            assert reply.created and job.state == tpb.JOB_STATE_QUEUED
            again = client.submit(KILL_SPEC, idempotency_key="run-1", adapter_id="tiny-tuned")
            assert not again.created and again.job.id == job.id
            with pytest.raises(grpc.RpcError) as info:
                client.submit({**KILL_SPEC, "seed": 4}, idempotency_key="run-1")
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            for event in client.watch(job.id, timeout=300):
                if event.kind == "step" and event.step >= kill_step:
                    break
        trainer.proc.send_signal(signal.SIGKILL)
        trainer.proc.wait(30)

        # dead mid-job: nothing published, the job still RUNNING at the step it reached
        store = JobStore(tmp_path / "trainer" / "jobs.sqlite")
        killed = store.get(job.id)
        store.close()
        assert killed.state == JobState.RUNNING and kill_step <= killed.step < TOTAL_STEPS
        folder = tmp_path / "trainer" / "jobs" / job.id / "checkpoints"
        newest = next(step for step, path in reversed(ckpt.checkpoints(folder)) if _verifies(path))
        assert 0 < newest <= killed.step and newest % CHECKPOINT_EVERY == 0
        # what a publish killed half way leaves: a hidden folder that is never an adapter
        leftover = adapters / ".tiny-tuned.tmp-killed"
        leftover.mkdir(parents=True)
        (leftover / "adapter_config.json").write_text('{"r": ')
        assert "tiny-tuned" not in {m.id for m in AdapterStore(adapters).list()}
        assert "tiny-tuned" not in {a.id for a in ex.list_adapters("tiny")}
        assert watcher.sightings == 0
        sightings_while_killed = watcher.sightings

        restarted = ServiceProcess("trainer", tmp_path, env)
        stack.callback(restarted.stop)
        with TrainerClient(restarted.address) as c:
            kinds: list[str] = []
            done = c.wait(job.id, on_event=lambda e: kinds.append(e.kind), timeout=300)
        assert done.state == tpb.JOB_STATE_SUCCEEDED, done.error
        assert done.attempts == 2 and done.resumed_from_step == newest and done.step == TOTAL_STEPS
        assert "requeued" in kinds and kinds[-1] == "finished" and "published" in kinds
        watcher.stop()

        manifest = AdapterStore(adapters).manifest("tiny-tuned", verify=True)
        assert watcher.partial == 0 and watcher.digests <= {manifest.digest}
        info = {a.id: a for a in ex.list_adapters("tiny")}["tiny-tuned"]
        assert info.digest == manifest.digest and json.loads(info.training_json)["job"] == job.id
        words = ["apple", "music", "kick"]
        base = ex.rate("tiny", words, ["visual"])
        tuned = ex.rate("tiny", words, ["visual"], adapter="tiny-tuned")
    assert tuned.adapter_digest == info.digest
    assert not np.allclose([r.expected for r in base.ratings], [r.expected for r in tuned.ratings], atol=1e-4)
    reliability.record("faults", "trainer killed mid-job", {
        "seed": KILL_SEED, "kill_step": kill_step, "step_reached": killed.step, "resumed_from_step": newest,
        "steps": TOTAL_STEPS, "checkpoint_every_steps": CHECKPOINT_EVERY, "store_listings": watcher.polls,
        "extractor_listings": watcher.extractor_polls, "partial_adapters_listed": watcher.partial,
        "listed_before_restart": sightings_while_killed})


def _verifies(path: Path) -> bool:
    try:
        ckpt.read(path)
    except ckpt.DamagedCheckpoint:
        return False
    return True


# ---- 3. clients that go away ----------------------------------------------------------------
DROP_WORDS = 10_000  # per dropped request: tens of seconds of work on two cores, if nobody stopped it
DROP_DIMENSIONS = ["visual", "auditory", "gustatory", "olfactory", "haptic", "interoceptive"]


def probe_rate(stub: epb_grpc.ExtractorStub) -> epb.RateResponse:
    return stub.Rate(epb.RateRequest(model="tiny", words=["apple"], dimensions=["visual"]), timeout=30)


def test_dropped_requests_stop_early_and_free_the_worker(tmp_path: Path, tiny_model_path: Path) -> None:
    """One worker, no queue: a request whose client went away must neither keep the worker busy
    nor leave it computing for nobody. Each dropped request is followed by a small one that must be
    served within seconds (the dropped work alone would take minutes), and the log shows where the
    dropped work stopped."""
    metrics = free_port()
    svc = ServiceProcess("extractor", tmp_path, extractor_env(
        tiny_model_path, SENSORIUM_EXTRACTOR_WORKERS="1", SENSORIUM_EXTRACTOR_MAX_QUEUED="0",
        SENSORIUM_EXTRACTOR_MAX_WORDS=str(DROP_WORDS), SENSORIUM_EXTRACTOR_METRICS_PORT=str(metrics)))
    recovery: dict[str, float] = {}
    refused: dict[str, int] = {}
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = epb_grpc.ExtractorStub(channel)
            probe_rate(stub)
            before = {m: cancelled_since(metrics, m, 0) for m in ("Extract", "Rate")}

            def big_extract(tag: str) -> epb.ExtractRequest:
                return epb.ExtractRequest(model="tiny", words=[f"{tag}{i}" for i in range(DROP_WORDS)], layers=[1],
                                          batch_size=8, template=epb.TemplateRef(dimension="visual"))

            def big_rate(tag: str) -> epb.RateRequest:
                return epb.RateRequest(model="tiny", words=[f"{tag}{i}" for i in range(DROP_WORDS)],
                                       dimensions=DROP_DIMENSIONS, batch_size=8)

            def recovered(name: str) -> None:
                _, recovery[name], refused[name] = served_after_refusals(lambda: probe_rate(stub))

            # a stream cancelled after its first chunk
            stream = stub.Extract(big_extract("stream"), metadata=(("x-request-id", "drop-stream"),))
            assert len(next(stream).words) == 8
            stream.cancel()
            recovered("extract stream cancelled")

            # an Extract whose deadline passes mid-stream
            with pytest.raises(grpc.RpcError) as info:
                for _ in stub.Extract(big_extract("late"), timeout=1.0, metadata=(("x-request-id", "late-extract"),)):
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            recovered("extract deadline")

            # a Rate whose deadline passes
            with pytest.raises(grpc.RpcError) as info:
                stub.Rate(big_rate("late"), timeout=3.0, metadata=(("x-request-id", "late-rate"),))
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            recovered("rate deadline")

            # a Rate the client cancels once the service is busy with it (a probe is refused meanwhile)
            future = stub.Rate.future(big_rate("gone"), metadata=(("x-request-id", "cancelled-rate"),))

            def busy() -> bool:
                try:
                    probe_rate(stub)
                except grpc.RpcError as exc:
                    return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False

            wait_until(busy, 30, "the big Rate to hold the only worker")
            future.cancel()
            recovered("rate cancelled")

            wait_until(lambda: all(cancelled_since(metrics, m, before[m]) >= 2 for m in before), 30,
                       "the dropped requests to be counted CANCELLED")
            cancelled = {m: cancelled_since(metrics, m, before[m]) for m in before}
    finally:
        svc.stop()

    stopped = {}
    for request_id in ("drop-stream", "late-extract"):
        (line,) = log_entries(svc.log, message="extracted", request_id=request_id)
        assert line["completed"] is False and line["cache_misses"] < DROP_WORDS // 2, line
        stopped[request_id] = line["cache_misses"] + line["cache_hits"]
    for request_id in ("late-rate", "cancelled-rate"):
        # "done" is absent when the cancellation came before the ratings began (the model lookup)
        (line,) = log_entries(svc.log, message="cancelled work stopped", request_id=request_id)
        assert line.get("done", 0) < DROP_WORDS * len(DROP_DIMENSIONS) // 2, line
        stopped[request_id] = line.get("done", 0)
    assert all(seconds < 10 for seconds in recovery.values()), recovery
    reliability.record("faults", "client drops", {
        "requests_dropped": 4, "words_per_dropped_request": DROP_WORDS,
        "words_done_before_stopping": stopped, "seconds_until_next_request_served": {
            k: round(v, 2) for k, v in recovery.items()}, "busy_refusals_meanwhile": refused,
        "counted_cancelled": cancelled})


def test_dropped_watch_streams_end_on_the_trainer(tmp_path: Path, tiny_model_path: Path) -> None:
    """A Watch follows a job for as long as it runs (hours): one whose client drops it, or whose
    deadline passes, must end on the server too, counted CANCELLED, with the trainer answering."""
    metrics = free_port()
    trainer = ServiceProcess("trainer", tmp_path, {**trainer_env(tiny_model_path, tmp_path / "adapters"),
                                                   "SENSORIUM_TRAINER_METRICS_PORT": str(metrics)})
    try:
        with TrainerClient(trainer.address, timeout=30) as client:
            endless = {**SPEC, "optim": {**SPEC["optim"], "max_steps": 100_000},
                       "eval": {"every_steps": 100_000, "checkpoint_every_steps": 100_000}}
            job = client.submit(endless, adapter_id="endless").job
            before = cancelled_since(metrics, "Watch", 0)
            stream = client.stub.Watch(tpb.WatchRequest(id=job.id))
            assert next(stream).kind == "queued"
            stream.cancel()
            with pytest.raises(grpc.RpcError) as info:
                for _ in client.stub.Watch(tpb.WatchRequest(id=job.id), timeout=1.0):
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_until(lambda: cancelled_since(metrics, "Watch", before) >= 2, 15, "both Watch streams to end")
            cancelled = cancelled_since(metrics, "Watch", before)
            started = time.monotonic()
            assert client.job(job.id).state in (tpb.JOB_STATE_QUEUED, tpb.JOB_STATE_RUNNING)
            answered = time.monotonic() - started
            assert answered < 5
            client.cancel(job.id)
    finally:
        trainer.proc.kill()  # the endless job needs no orderly stop: its folder is thrown away
        trainer.stop()
    reliability.record("faults", "trainer watch dropped", {
        "streams_dropped": 2, "counted_cancelled": cancelled,
        "seconds_to_answer_next_request": round(answered, 3)})
