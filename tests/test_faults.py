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

import asyncio
import contextlib
import errno
import json
import os
import random
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

import reliability
from conftest import ServiceProcess, extractor_env
from sensorium import wire
from sensorium.activations import iter_activations
from sensorium.cache import MANIFEST, Space, VectorCache
from sensorium.client import ExtractorClient, TrainerClient
from sensorium.experiment.launcher import free_port
from sensorium.models.adapters import AdapterStore
from sensorium.models.store import LoadedModel, ModelSpec, ModelStore, PathSource, load_model
from sensorium.training import checkpoint as ckpt
from sensorium.training.jobs import JobRunner, JobState, JobStore
from sensorium.v1 import extractor_pb2 as epb
from sensorium.v1 import extractor_pb2_grpc as epb_grpc
from sensorium.v1 import trainer_pb2 as tpb
from sensorium.v1 import trainer_pb2_grpc as tpb_grpc
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


def _verifies(path: Path) -> bool:
    """Whether a checkpoint folder passes the checks a resuming trainer makes (every file's checksum)."""
    try:
        ckpt.read(path)
    except ckpt.DamagedCheckpoint:
        return False
    return True


def test_trainer_killed_at_a_random_step_resumes_and_never_lists_a_partial_adapter(
        tmp_path: Path, tiny_model_path: Path) -> None:
    """SIGKILL (no chance to clean up) at a seeded random step after the first checkpoint; the
    restarted trainer resumes the job from the newest checkpoint that verifies and publishes the
    adapter, which the extractor then serves. Meanwhile the store is listed continuously: the
    adapter must not appear before it is complete, nor after the kill, nor may the leftover of a
    publish killed half way (a hidden temporary folder) ever be listed."""
    kill_step = random.Random(KILL_SEED).randrange(CHECKPOINT_EVERY + 1, TOTAL_STEPS - 1)
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


# ---- 2. the extractor killed while it writes its cache, and caches damaged on disk ------------
CACHE_LAYERS = [0, 1, 2]
EXTRACTOR_KILLS = 10 if reliability.HEAVY else 3


@pytest.fixture(scope="module")
def local_tiny(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model in this process: every served vector is checked against its recomputation."""
    spec = ModelSpec(name="tiny", source=PathSource(path=tiny_model_path), device="cpu")
    return load_model(spec, ModelStore(tmp_path_factory.mktemp("faults-store")))


class Recomputed:
    """Vectors recomputed in this process (``iter_activations``), each word once, to check served ones by."""

    def __init__(self, local: LoadedModel, layers: list[int]) -> None:
        self.local, self.layers = local, layers
        self.vectors: dict[str, dict[int, np.ndarray]] = {}
        self.compared = self.mismatches = 0

    def check(self, served: dict[str, dict[int, np.ndarray]]) -> None:
        """Compare every served vector with its recomputation (tolerance 1e-5), counting mismatches."""
        missing = [w for w in served if w not in self.vectors]
        for first, by_layer in iter_activations(self.local.model, self.local.tokenizer, missing, self.layers,
                                                "last", batch_size=64):
            for k, rows in by_layer.items():
                for word, row in zip(missing[first:first + len(rows)], rows):
                    self.vectors.setdefault(word, {})[k] = row
        for word, by_layer in served.items():
            for k, vector in by_layer.items():
                self.compared += 1
                self.mismatches += not np.allclose(vector, self.vectors[word][k], atol=1e-5, rtol=0)


def extract_all(address: str, words: list[str]) -> tuple[dict[str, dict[int, np.ndarray]], int]:
    """Every word's vectors at ``CACHE_LAYERS`` as the extractor serves them, and how many came from its cache."""
    out: dict[str, dict[int, np.ndarray]] = {}
    from_cache = 0
    with grpc.insecure_channel(address) as channel:
        request = epb.ExtractRequest(model="tiny", words=words, layers=CACHE_LAYERS, batch_size=64)
        for chunk in epb_grpc.ExtractorStub(channel).Extract(request, timeout=300):
            for word, row in zip(chunk.words, wire.matrix_from_proto(chunk.vectors, "vectors")):
                out.setdefault(word, {})[chunk.layer] = row
            from_cache += chunk.from_cache
    assert list(out) == words and all(sorted(v) == CACHE_LAYERS for v in out.values())
    return out, from_cache


def test_extractor_killed_during_extract_traffic_never_serves_a_wrong_vector(
        tmp_path: Path, tiny_model_path: Path, local_tiny: LoadedModel) -> None:
    """SIGKILL while small Extract requests stream in, each ending in a flush that rewrites megabytes
    of cache (so most moments are inside a write): the kill comes as soon as the n-th temporary file
    of the cache shows (n seeded), so it lands inside some write of some flush. After each restart
    every word ever requested is extracted again and every vector compared with its recomputation:
    the cache loaded, or was set aside as damaged and rebuilt, but never served a wrong vector."""
    rng = random.Random(KILL_SEED)
    cache = tmp_path / "extractor" / "cache"
    env = extractor_env(tiny_model_path)
    recomputed = Recomputed(local_tiny, CACHE_LAYERS)
    words = [f"base{i}" for i in range(3000)]
    kills: list[dict[str, Any]] = []
    svc = ServiceProcess("extractor", tmp_path, env)
    try:
        extract_all(svc.address, words)  # a cache worth writing
        for round_ in range(EXTRACTOR_KILLS):
            sent: list[str] = []

            def traffic(address: str = svc.address, round_: int = round_) -> None:
                with grpc.insecure_channel(address) as channel:
                    stub = epb_grpc.ExtractorStub(channel)
                    n = 0
                    while True:
                        batch = [f"k{round_}r{n}w{i}" for i in range(8)]
                        sent.extend(batch)  # before the call: a kill mid-request may leave them cached
                        try:
                            list(stub.Extract(epb.ExtractRequest(model="tiny", words=batch, layers=CACHE_LAYERS),
                                              timeout=60))
                        except grpc.RpcError:
                            return  # the kill
                        n += 1

            thread = threading.Thread(target=traffic, daemon=True)
            thread.start()
            wait_until(lambda: len(sent) > 8, 30, "the traffic to get going")
            # the kill point: the n-th temporary file seen (n seeded), i.e. some write of some flush
            nth, seen, deadline = rng.randint(1, 12), set(), time.monotonic() + 10
            while len(seen) < nth and time.monotonic() < deadline:
                seen.update(entry.name for entry in os.scandir(cache) if entry.name.endswith(".tmp"))
            writing = len(seen) >= nth
            svc.proc.send_signal(signal.SIGKILL)
            svc.proc.wait(30)
            thread.join(60)
            left = sorted(p.name for p in cache.iterdir() if p.name.endswith(".tmp"))
            damaged_before = len(log_entries(svc.log, logger="sensorium.cache", level="WARNING"))
            words += sent

            svc = ServiceProcess("extractor", tmp_path, env)
            served, from_cache = extract_all(svc.address, words)
            recomputed.check(served)
            rebuilt = len(log_entries(svc.log, logger="sensorium.cache", level="WARNING")) > damaged_before
            assert from_cache == 0 if rebuilt else from_cache >= 3000 * len(CACHE_LAYERS)
            assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # the flush cleared leftovers
            kills.append({"requests_before_kill": len(sent) // 8, "killed_at_temporary_file": nth if writing else None,
                          "temporary_files_left": len(left), "cache": "rebuilt" if rebuilt else "loaded",
                          "vectors_from_cache": from_cache})
    finally:
        svc.stop()
    assert recomputed.mismatches == 0 and recomputed.compared >= EXTRACTOR_KILLS * 3000 * len(CACHE_LAYERS)
    reliability.record("faults", "extractor killed during extract traffic", {
        "seed": KILL_SEED, "kills": kills, "vectors_compared": recomputed.compared,
        "mismatches": recomputed.mismatches})


def pristine_cache(root: Path, local: LoadedModel, words: list[str]) -> list[Space]:
    """A flushed cache of ``words`` at two layers, the state each damage below starts from."""
    cache = VectorCache(root)
    spaces = [Space(model=local.digest, pooling="last", layer=k) for k in (1, 2)]
    for first, by_layer in iter_activations(local.model, local.tokenizer, words, [1, 2], "last", batch_size=64):
        for space in spaces:
            rows = by_layer[space.layer]
            cache.put_many(space, words[first:first + len(rows)], rows)
    cache.flush()
    return spaces


def _named_files(root: Path) -> list[Path]:
    """The space files a cache's manifest names (what a crash can tear), in a fixed order."""
    return sorted(p for p in root.iterdir() if p.name != MANIFEST and not p.name.startswith("."))


def _torn(root: Path) -> None:  # the rename reached the disk, the data did not (power loss)
    target = _named_files(root)[0]
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


def _zeroed(root: Path) -> None:  # the blocks were allocated, never written
    target = _named_files(root)[-1]
    target.write_bytes(bytes(target.stat().st_size))


def _missing(root: Path) -> None:
    _named_files(root)[0].unlink()


def _manifest_torn(root: Path) -> None:
    (root / MANIFEST).write_bytes((root / MANIFEST).read_bytes()[:40])


def _cross_wired(root: Path) -> None:  # each space named by the other's (intact, checksummed) files
    manifest = json.loads((root / MANIFEST).read_text())
    a, b = manifest["spaces"]
    manifest["spaces"] = {a: manifest["spaces"][b], b: manifest["spaces"][a]}
    (root / MANIFEST).write_text(json.dumps(manifest))


def _temporary_left(root: Path) -> None:  # killed while writing a temporary file: the cache is intact
    name = _named_files(root)[0].name
    (root / f".{name}.killed.tmp").write_bytes((root / name).read_bytes()[:100])


def _killed_before_manifest(root: Path, local: LoadedModel) -> None:
    """New vectors written, the process gone before the manifest named them."""
    cache = VectorCache(root)
    words = ["late-a", "late-b"]
    for _, by_layer in iter_activations(local.model, local.tokenizer, words, [1], "last"):
        cache.put_many(Space(model=local.digest, pooling="last", layer=1), words, by_layer[1])

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed before the manifest")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sensorium.cache.atomic_write_json", killed)
        with pytest.raises(KeyboardInterrupt):
            cache.flush()


DAMAGE: dict[str, tuple[Callable[..., None], str]] = {
    "a file the manifest names is torn": (_torn, "rebuilt"),
    "a file the manifest names is zeros": (_zeroed, "rebuilt"),
    "a file the manifest names is missing": (_missing, "rebuilt"),
    "the manifest is torn": (_manifest_torn, "rebuilt"),
    "the manifest names another space's files": (_cross_wired, "rebuilt"),
    "a half-written temporary file is left": (_temporary_left, "loaded"),
    "killed after the vectors, before the manifest": (_killed_before_manifest, "loaded"),
}


def test_a_damaged_cache_is_set_aside_and_never_serves_a_wrong_vector(
        tmp_path: Path, local_tiny: LoadedModel) -> None:
    """What a crash or a torn write can leave of a cache, deterministically: each state is loaded
    by a fresh cache, which either loads it (and its next flush clears what the crash left) or sets
    it aside and starts empty; every vector it serves is compared with its recomputation."""
    words = [f"w{i}" for i in range(200)]
    pristine = tmp_path / "pristine"
    spaces = pristine_cache(pristine, local_tiny, words)
    recomputed = Recomputed(local_tiny, [1, 2])
    outcomes: dict[str, str] = {}
    for n, (case, (damage, expected)) in enumerate(DAMAGE.items()):
        root = tmp_path / f"case{n}" / "cache"
        shutil.copytree(pristine, root)
        if damage is _killed_before_manifest:
            damage(root, local_tiny)
        else:
            damage(root)
        cache = VectorCache(root)
        outcomes[case] = "rebuilt" if cache.stats.corrupt_rebuilds else "loaded"
        assert outcomes[case] == expected, case
        served: dict[str, dict[int, np.ndarray]] = {}
        for space in spaces:
            hits, misses = cache.get_many(space, words)
            assert (not hits) if expected == "rebuilt" else (not misses), case
            for word, vector in hits.items():
                served.setdefault(word, {})[space.layer] = vector
        recomputed.check(served)
        if expected == "rebuilt":
            assert len(list(root.parent.glob("cache.corrupt-*"))) == 1, case
        cache.put_many(spaces[0], ["after"], np.ones((1, local_tiny.hidden_size), np.float32))
        cache.flush()  # a fresh flush leaves exactly what its manifest names
        named = {name for files in json.loads((root / MANIFEST).read_text())["spaces"].values() for name in files}
        assert {p.name for p in root.iterdir()} == named | {MANIFEST}, case
        assert VectorCache(root).stats.corrupt_rebuilds == 0
    assert recomputed.mismatches == 0
    reliability.record("faults", "damaged vector cache", {
        "cases": outcomes, "vectors_compared": recomputed.compared, "mismatches": recomputed.mismatches})


# ---- 3. clients that go away ----------------------------------------------------------------
DROP_WORDS = 10_000  # per dropped request: tens of seconds of work on two cores, if nobody stopped it
DROP_DIMENSIONS = ["visual", "auditory", "gustatory", "olfactory", "haptic", "interoceptive"]


def probe_rate(stub: epb_grpc.ExtractorStub) -> epb.RateResponse:
    """The small request that must be served promptly after each dropped one."""
    return stub.Rate(epb.RateRequest(model="tiny", words=["apple"], dimensions=["visual"]), timeout=30)


def test_dropped_requests_stop_early_and_free_the_worker(tmp_path: Path, tiny_model_path: Path) -> None:
    """One worker, no queue: a request whose client went away must neither keep the worker busy
    nor leave it computing for nobody. Each dropped request is followed by a small one that must be
    served within seconds (the dropped work would go on for tens of seconds), the log shows where the
    dropped work stopped, and the exporter counts the dropped calls CANCELLED."""
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
            def send() -> grpc.Future:
                return stub.Rate.future(big_rate("gone"), metadata=(("x-request-id", "cancelled-rate"),))

            future = send()

            def busy() -> bool:
                nonlocal future
                if future.done():  # refused: a probe held the worker when it came; send it again
                    assert future.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED, future.exception()
                    future = send()
                    return False
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


# ---- 4. a full or read-only disk ------------------------------------------------------------------
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def disk_refuses(root: Path, code: int) -> Iterator[list[str]]:
    """Writes under ``root`` fail as a full or a read-only disk makes them fail; yields what was refused.

    Running as root, permissions cannot make a folder read-only, so the failure is injected where
    the kernel would report it: a full disk (ENOSPC, EDQUOT) at ``os.fsync`` of a file under
    ``root`` (the write went to the page cache; the disk refuses the blocks), a read-only one
    (EROFS, EACCES, EPERM) when a file or folder is created there. Writes elsewhere go through.
    """
    real_fsync, real_open, real_mkdir = os.fsync, os.open, os.mkdir
    prefix = str(Path(root).resolve())
    refused: list[str] = []

    def under(path: Any) -> bool:
        text = os.path.abspath(os.fsdecode(path))
        return text == prefix or text.startswith(prefix + os.sep)

    def refuse(path: Any) -> OSError:
        refused.append(os.fsdecode(path))
        return OSError(code, os.strerror(code), os.fsdecode(path))

    def fsync(fd: int) -> None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if code in FULL_ERRNOS and path and under(path):
            raise refuse(path)
        real_fsync(fd)

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if code in READ_ONLY_ERRNOS and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            raise refuse(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        if code in READ_ONLY_ERRNOS and under(path) and not os.path.lexists(path):  # an existing one: EEXIST
            raise refuse(path)
        real_mkdir(path, mode, dir_fd=dir_fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        mp.setattr(os, "open", open_)
        mp.setattr(os, "mkdir", mkdir)
        yield refused


def expected_refusal(code: int, store: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a write to ``store`` refused with errno ``code`` must be answered with."""
    if code in FULL_ERRNOS:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"no space left on the {store} store"
    return grpc.StatusCode.FAILED_PRECONDITION, f"the {store} store is read-only or not writable"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too, so a leftover temporary file shows), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} | \
        {str(p.relative_to(root)) + "/": b"" for p in sorted(root.rglob("*")) if p.is_dir()}


class InProcessServer:
    """A servicer behind ``start_server`` on an event loop in a thread of this process.

    Faults injected by monkeypatching this process reach the service only when it runs here; the
    server is the deployed one all the same (interceptors, error translation, worker slots).
    """

    def __init__(self, settings: Any, add: Callable[[grpc.aio.Server], list[str]],
                 ready: Callable[[], Any] | None = None, stop: Callable[[], Any] | None = None) -> None:
        from services.common import start_server

        self.stop_hook = stop
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = self.call(start_server(settings, add))
        if ready is not None:
            self.call(ready())
        self.call(self.running.mark_ready())
        self.address = f"127.0.0.1:{self.running.port}"

    def call(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.running.shutdown(0))
        if self.stop_hook is not None:
            self.call(self.stop_hook())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


KEPT_TABLE = b"word,visual,auditory\napple,4.5,1.0\nmusic,0.5,4.9\nthunder,1.5,4.8\n"
NEW_TABLE = b"word,visual\nsnow,4.0\nhoney,3.0\nstone,3.5\n"


def test_a_full_or_read_only_table_store_is_named_and_keeps_its_tables(tmp_path: Path) -> None:
    """RegisterTable on a disk that refuses the write, for each way a disk refuses: a new table and
    the replacement of a stored one are both answered with a status and a message naming the store,
    and the store is left byte for byte as it was, its table still verified and served."""
    from services.analyzer.servicer import AnalyzerServicer
    from services.analyzer.settings import AnalyzerSettings
    from sensorium.v1 import analyzer_pb2 as apb
    from sensorium.v1 import analyzer_pb2_grpc as apb_grpc

    settings = AnalyzerSettings(port=0, data_dir=tmp_path / "analyzer")
    servicers: list[AnalyzerServicer] = []

    def add(server: grpc.aio.Server) -> list[str]:
        servicers.append(AnalyzerServicer(settings))
        apb_grpc.add_AnalyzerServicer_to_server(servicers[0], server)
        return [apb.DESCRIPTOR.services_by_name["Analyzer"].full_name]

    root = tmp_path / "analyzer" / "tables"
    answered: dict[str, str] = {}
    server = InProcessServer(settings, add)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = apb_grpc.AnalyzerStub(channel)
            stub.RegisterTable(apb.RegisterTableRequest(name="kept", csv=KEPT_TABLE), timeout=30)
            before = snapshot(root)
            for code in FULL_ERRNOS + READ_ONLY_ERRNOS:
                status, message = expected_refusal(code, "analyzer tables")
                with disk_refuses(root, code) as refused:
                    for request in (apb.RegisterTableRequest(name="new", csv=NEW_TABLE),
                                    apb.RegisterTableRequest(name="kept", csv=NEW_TABLE, replace=True)):
                        with pytest.raises(grpc.RpcError) as info:
                            stub.RegisterTable(request, timeout=30)
                        assert info.value.code() == status and message in info.value.details(), info.value
                assert refused and snapshot(root) == before
                assert [t.name for t in stub.ListTables(apb.ListTablesRequest(), timeout=30).tables] == ["kept"]
                assert servicers[0].tables.get("kept").words == ("apple", "music", "thunder")  # checksum verified
                answered[errno.errorcode[code]] = info.value.code().name
            stub.RegisterTable(apb.RegisterTableRequest(name="new", csv=NEW_TABLE), timeout=30)  # the disk is back
    finally:
        server.close()
    reliability.record("faults", "table store full or read-only", {
        "refused_with": answered, "requests_refused": 2 * len(answered), "message_names_the_store": True,
        "temporary_files_left": 0, "stored_table_intact": True})


def test_a_full_or_read_only_adapter_or_job_store_fails_named_and_keeps_what_it_holds(
        tmp_path: Path, tiny_model_path: Path) -> None:
    """A job whose adapter cannot be published fails with a message naming the adapter store, the
    half-built entry removed and the adapters already published intact; a submission the job store
    cannot take (SQLite finds the database full, or read-only) is refused the same way, the jobs
    already stored still listed."""
    from conftest import publish_lora
    from services.trainer.servicer import TrainerServicer
    from services.trainer.settings import TrainerSettings

    adapters = tmp_path / "adapters"
    publish_lora(tiny_model_path, adapters, "kept", seed=1)
    before = snapshot(adapters)
    model = {"name": "tiny", "source": {"path": str(tiny_model_path)}, "device": "cpu"}
    settings = TrainerSettings(port=0, data_dir=tmp_path / "trainer", adapters_dir=adapters, device="cpu",
                               models={"tiny": model})
    servicers: list[TrainerServicer] = []

    def add(server: grpc.aio.Server) -> list[str]:
        servicers.append(TrainerServicer(settings))
        tpb_grpc.add_TrainerServicer_to_server(servicers[0], server)
        return [tpb.DESCRIPTOR.services_by_name["Trainer"].full_name]

    quick = {**SPEC, "optim": {**SPEC["optim"], "max_steps": 2}, "eval": {"every_steps": 2}}
    failed: dict[str, str] = {}
    server = InProcessServer(settings, add, ready=lambda: servicers[0].ready(), stop=lambda: servicers[0].stop())
    try:
        with TrainerClient(server.address, timeout=60) as client:
            for adapter_id, code in (("full", errno.ENOSPC), ("read-only", errno.EROFS)):
                with disk_refuses(adapters, code) as refused:
                    job = client.submit(quick, adapter_id=adapter_id).job
                    done = client.wait(job.id, timeout=300)
                _, message = expected_refusal(code, "adapter")
                assert refused and done.state == tpb.JOB_STATE_FAILED and message in done.error, done
                assert snapshot(adapters) == before  # no half-built entry, nothing else touched
                assert [m.id for m in AdapterStore(adapters).list()] == ["kept"]
                AdapterStore(adapters).manifest("kept", verify=True)
                failed[errno.errorcode[code]] = "JOB_STATE_FAILED"

            # the job store: the runner paused (nothing is written behind the test's back), then
            # SQLite's own limits: the database may not grow, then it may not be written at all
            servicers[0].runner.stop()
            store = servicers[0].store
            stored = {j.id for j in client.jobs()}
            with store._lock:
                pages = store._db.execute("PRAGMA page_count").fetchone()[0]
                store._db.execute(f"PRAGMA max_page_count = {pages}")
            refusals: dict[str, str] = {}
            for n in range(200):  # the last page's free room takes a few more
                try:
                    stored.add(client.submit(quick, adapter_id=f"queued-{n}").job.id)
                except grpc.RpcError as exc:
                    status, message = expected_refusal(errno.ENOSPC, "job")
                    assert exc.code() == status and message in exc.details(), exc
                    refusals["full"] = exc.code().name
                    break
            with store._lock:
                store._db.execute("PRAGMA max_page_count = 1073741823")
                store._db.execute("PRAGMA query_only = 1")
            with pytest.raises(grpc.RpcError) as info:
                client.submit(quick, adapter_id="refused")
            status, message = expected_refusal(errno.EROFS, "job")
            assert info.value.code() == status and message in info.value.details(), info.value
            refusals["read-only"] = info.value.code().name
            assert {j.id for j in client.jobs(limit=1000)} == stored
            with store._lock:
                assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
                store._db.execute("PRAGMA query_only = 0")
            client.submit(quick, adapter_id="accepted")  # the disk is back
    finally:
        server.close()
    assert set(refusals) == {"full", "read-only"}
    reliability.record("faults", "adapter and job stores full or read-only", {
        "jobs_failed_publishing": failed, "job_store_refused_submissions_with": refusals,
        "message_names_the_store": True, "temporary_folders_left": 0, "stored_adapters_intact": True,
        "stored_jobs_intact": True})


def test_the_job_runner_outlives_a_job_store_that_fills_mid_job(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The job store filling while a job runs is not the job's failure: its progress cannot be
    recorded, so it stops; the runner carries on, and once the store takes writes again the job is
    requeued and runs to the end (a real job resumes from its checkpoint)."""
    caplog.set_level("ERROR", logger="sensorium.training.jobs")
    store = JobStore(tmp_path / "jobs.sqlite")
    filled = threading.Event()

    def execute(job: Any, record: Callable[[str, dict[str, Any]], None], should_stop: Callable[[], bool]) -> Any:
        for step in range(1, 301):
            try:
                record("step", {"step": step, "total_steps": 300})
            except Exception:
                filled.set()
                raise
        return {"loss": 0.5}

    runner = JobRunner(store, execute, poll_seconds=0.05)
    job, _ = store.submit("{}", "d" * 64, adapter_id="a", total_steps=300)
    with store._lock:  # room for the job to start, not to finish: SQLite's own limit, as a full disk
        store._db.execute(f"PRAGMA max_page_count = {store._db.execute('PRAGMA page_count').fetchone()[0] + 2}")
    runner.start()
    try:
        wait_until(filled.is_set, 30, "the job store to fill mid-job")
        stuck = store.get(job.id)
        assert stuck.state == JobState.RUNNING and 0 < stuck.step < 300
        wait_until(lambda: sum("job store cannot be written" in r.getMessage() for r in caplog.records) >= 3, 30,
                   "the runner to retry")
        assert runner._thread is not None and runner._thread.is_alive()
        with store._lock:
            store._db.execute("PRAGMA max_page_count = 1073741823")
        done = wait_until(lambda: (j := store.get(job.id)).state.final and j, 30, "the job to finish")
    finally:
        runner.stop(10)
        store.close()
    assert done.state == JobState.SUCCEEDED and done.attempts == 2
    kinds = [e.kind for e in JobStore(tmp_path / "jobs.sqlite").events(job.id)]
    assert kinds.count("requeued") == 1 and kinds[-1] == "finished"
    reliability.record("faults", "job store filled mid-job", {
        "step_when_full": stuck.step, "runner_survived": True, "requeued_and_finished": True})


def test_a_cache_flush_the_disk_refuses_keeps_serving_correct_vectors(
        tmp_path: Path, tiny_model_path: Path, local_tiny: LoadedModel, caplog: pytest.LogCaptureFixture) -> None:
    """The extractor's choice (see ``ExtractorServicer._flush``): a vector cache that cannot be saved
    is a warning for the operator, not the caller's error. Extract answers with correct vectors,
    later requests are served from memory, the cache on disk stays byte for byte the previous one,
    and once the disk takes writes again the next flush saves everything, vectors still correct."""
    from services.extractor.servicer import ExtractorServicer
    from services.extractor.settings import ExtractorSettings

    model = {"name": "tiny", "source": {"path": str(tiny_model_path)}, "kind": "causal-lm", "device": "cpu"}
    settings = ExtractorSettings(port=0, data_dir=tmp_path / "extractor", adapters_dir=tmp_path / "adapters",
                                 models={"tiny": model}, preload=["tiny"])
    servicers: list[ExtractorServicer] = []

    def add(server: grpc.aio.Server) -> list[str]:
        servicers.append(ExtractorServicer(settings))
        epb_grpc.add_ExtractorServicer_to_server(servicers[0], server)
        return [epb.DESCRIPTOR.services_by_name["Extractor"].full_name]

    caplog.set_level("WARNING", logger="services.extractor.servicer")
    root = settings.vector_cache
    recomputed = Recomputed(local_tiny, CACHE_LAYERS)
    words = [f"kept{i}" for i in range(50)]
    server = InProcessServer(settings, add, ready=lambda: servicers[0].ready())
    try:
        recomputed.check(extract_all(server.address, words)[0])
        before = snapshot(root)
        for code in (errno.ENOSPC, errno.EROFS):
            fresh = [f"{errno.errorcode[code]}{i}" for i in range(50)]
            with disk_refuses(root, code) as refused:
                served, from_cache = extract_all(server.address, fresh)
                again, cached = extract_all(server.address, words + fresh)
            assert refused and from_cache == 0 and cached == len(words + fresh) * len(CACHE_LAYERS)
            recomputed.check(served)
            recomputed.check(again)
            assert snapshot(root) == before  # nothing written, no temporary file left
            words += fresh
        warnings = [r.getMessage() for r in caplog.records if "vector cache not saved" in r.getMessage()]
        assert len(warnings) == 4 and servicers[0].cache.stats.failed_flushes == 4
        assert "no space left on the vector cache store" in warnings[0]
        assert "the vector cache store is read-only" in warnings[-1]
        extract_all(server.address, ["after"])  # the disk is back: this flush saves every space
        reloaded = VectorCache(root)
        assert reloaded.stats.corrupt_rebuilds == 0
        for k in CACHE_LAYERS:
            hits, misses = reloaded.get_many(Space(model=local_tiny.digest, pooling="last", layer=k), words)
            assert not misses
            recomputed.check({w: {k: v} for w, v in hits.items()})
    finally:
        server.close()
    assert recomputed.mismatches == 0
    reliability.record("faults", "vector cache flush refused", {
        "choice": "warn and keep serving", "flushes_refused": 4, "requests_failed": 0,
        "vectors_compared": recomputed.compared, "mismatches": recomputed.mismatches,
        "saved_once_the_disk_was_back": len(words) * len(CACHE_LAYERS)})


@pytest.mark.parametrize(("code", "status"), [(errno.ENOSPC, "StorageFull"), (errno.EROFS, "StorageReadOnly")])
def test_a_checkpoint_the_disk_refuses_is_named_and_keeps_the_previous_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, status: str) -> None:
    """A job whose checkpoint cannot be written fails with the store named, not an errno; the last
    good checkpoint stays as it was and no half-written folder is left."""
    import torch

    from sensorium import errors

    state = {"adapter": {"w": torch.ones(3)}, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {},
             "state": {"epoch": 0}, "rng": ckpt.capture_rng()}
    good = ckpt.save(tmp_path, 5, **state)
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def refuse(path: Path) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ckpt, "fsync_path", refuse)
    with pytest.raises(getattr(errors, status), match="training checkpoint store"):
        ckpt.save(tmp_path, 10, **state)
    monkeypatch.undo()
    assert [step for step, _ in ckpt.checkpoints(tmp_path)] == [5]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]
    assert ckpt.load_latest(tmp_path).step == 5
