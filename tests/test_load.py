"""Load on loopback: many clients at once against the extractor and the analyzer, as real processes.

16 clients x 50 requests each (64 x 200 with SENSORIUM_RELIABILITY=heavy), every client on its
own channel in its own thread, each a bounded loop: no valid request may fail, and the figures
(p50/p99 latency, throughput, the service's peak resident memory) are recorded for README.
Beyond the configured queue depth a service must refuse at once with RESOURCE_EXHAUSTED rather
than queue without bound. Time bounds are loose on purpose: the machine is shared and noisy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

import reliability
from conftest import ServiceProcess, extractor_env
from sensorium import wire
from sensorium.v1 import analyzer_pb2 as apb
from sensorium.v1 import analyzer_pb2_grpc as apb_grpc
from sensorium.v1 import common_pb2 as cpb
from sensorium.v1 import extractor_pb2 as epb
from sensorium.v1 import extractor_pb2_grpc as epb_grpc

pytestmark = pytest.mark.slow

CLIENTS, PER_CLIENT = (64, 200) if reliability.HEAVY else (16, 50)
# stated bounds on the services' peak resident memory under this load (tiny model; README says so)
PEAK_MIB = {"extractor": 1024, "analyzer": 512}
VOCAB = ["apple", "music", "kick", "lemon", "thunder", "velvet", "garlic", "whisper", "hammer", "honey",
         "smoke", "river", "bell", "pepper", "silk", "drum", "ice", "rose", "stone", "salt", "cloud", "bread"]


def peak_rss_mib(pid: int) -> float:
    """The process's high-water resident set (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def figures(self, pid: int) -> dict[str, float | int]:
        lat = np.array(self.latencies) * 1000
        return {"clients": CLIENTS, "requests_per_client": PER_CLIENT, "ok": len(self.latencies),
                "failed": len(self.failures), "p50_ms": round(float(np.percentile(lat, 50)), 1),
                "p99_ms": round(float(np.percentile(lat, 99)), 1),
                "throughput_per_s": round(len(self.latencies) / self.seconds, 1),
                "seconds": round(self.seconds, 1), "peak_rss_mib": round(peak_rss_mib(pid), 1)}


def hammer(address: str, request: Callable[[grpc.Channel, np.random.Generator, int], None]) -> LoadResult:
    """CLIENTS threads, each on its own channel, each sending PER_CLIENT requests one after another."""
    result = LoadResult()
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client(index: int) -> None:
        rng = np.random.default_rng(index)
        with grpc.insecure_channel(address) as channel:
            start.wait()
            for i in range(PER_CLIENT):
                began = time.perf_counter()
                try:
                    request(channel, rng, i)
                except grpc.RpcError as exc:
                    with lock:
                        result.failures.append(f"client {index} request {i}: {exc.code().name} {exc.details()}")
                    continue
                with lock:
                    result.latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    result.seconds = time.perf_counter() - began
    return result


@pytest.fixture(scope="module")
def extractor(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path,
              tiny_adapters: list[str]) -> Iterator[ServiceProcess]:
    svc = ServiceProcess("extractor", tmp_path_factory.mktemp("load-extractor"), extractor_env(
        tiny_model_path, SENSORIUM_EXTRACTOR_MAX_QUEUED=str(CLIENTS)))
    yield svc
    svc.stop()


def test_extractor_under_load_answers_every_valid_request(extractor: ServiceProcess) -> None:
    def request(channel: grpc.Channel, rng: np.random.Generator, i: int) -> None:
        stub = epb_grpc.ExtractorStub(channel)
        words = list(rng.choice(VOCAB, size=4, replace=False))
        if i % 2:
            reply = stub.Rate(epb.RateRequest(model="tiny", words=words, dimensions=["visual"],
                                              adapter="tiny-a" if i % 4 == 1 else ""), timeout=120)
            assert len(reply.ratings) == 4 and all(0 <= r.expected <= 5 for r in reply.ratings)
        else:
            chunks = list(stub.Extract(epb.ExtractRequest(model="tiny", words=words, layers=[0, 2]), timeout=120))
            assert sorted(c.layer for c in chunks) == [0, 2] and all(c.vectors.rows == 4 for c in chunks)

    result = hammer(extractor.address, request)
    assert not result.failures, result.failures[:5]
    assert len(result.latencies) == CLIENTS * PER_CLIENT
    figures = result.figures(extractor.proc.pid)
    assert figures["peak_rss_mib"] < PEAK_MIB["extractor"], figures
    assert extractor.proc.poll() is None
    reliability.record("load", "extractor", {**figures, "peak_bound_mib": PEAK_MIB["extractor"],
                                             "requests": "Rate (4 words, 1 dimension, base or adapter) and "
                                                         "Extract (4 words, 2 layers), alternating"})


def rsa_request(rng: np.random.Generator, n_words: int, n_bootstrap: int) -> apb.RsaRequest:
    human = rng.uniform(0, 5, (n_words, 6))
    model = human + rng.normal(0, 1, human.shape)
    inline = apb.InlineRepresentations(
        words=[f"w{i}" for i in range(n_words)], feature_names=[f"f{j}" for j in range(6)],
        human=wire.matrix_to_proto(human), models=[cpb.NamedMatrix(name="m", matrix=wire.matrix_to_proto(model))])
    return apb.RsaRequest(data=apb.Representations(inline=inline),
                          options=apb.RsaOptions(n_bootstrap=n_bootstrap, seed=int(rng.integers(1 << 32))))


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    svc = ServiceProcess("analyzer", tmp_path_factory.mktemp("load-analyzer"),
                         {"SENSORIUM_ANALYZER_MAX_QUEUED": str(CLIENTS)})
    yield svc
    svc.stop()


def test_analyzer_under_load_answers_every_valid_request(analyzer: ServiceProcess) -> None:
    def request(channel: grpc.Channel, rng: np.random.Generator, i: int) -> None:
        stub = apb_grpc.AnalyzerStub(channel)
        req = rsa_request(rng, 40, 20)
        if i % 2:
            reply = stub.CompareDimensions(apb.DimensionsRequest(data=req.data, n_bootstrap=20), timeout=120)
            assert len(reply.correlations) == 6
        else:
            reply = stub.ComputeRsa(req, timeout=120)
            assert len(reply.results) == 1 and 0 < reply.results[0].rsa <= 1

    result = hammer(analyzer.address, request)
    assert not result.failures, result.failures[:5]
    figures = result.figures(analyzer.proc.pid)
    assert figures["peak_rss_mib"] < PEAK_MIB["analyzer"], figures
    reliability.record("load", "analyzer", {**figures, "peak_bound_mib": PEAK_MIB["analyzer"],
                                            "requests": "ComputeRsa (40 words x 6 features, 20 bootstrap "
                                                        "resamples) and CompareDimensions, alternating"})


def _slow_call(service: str) -> Callable[[grpc.Channel, int], None]:
    """A request that keeps a worker busy for a second or so on this machine."""
    if service == "analyzer":
        return lambda ch, i: apb_grpc.AnalyzerStub(ch).ComputeRsa(
            rsa_request(np.random.default_rng(i), 200, 400), timeout=600)
    words = [f"w{j}" for j in range(3_000)]
    return lambda ch, i: epb_grpc.ExtractorStub(ch).Rate(
        epb.RateRequest(model="tiny", words=words, dimensions=["visual"], batch_size=64), timeout=600)


@pytest.mark.parametrize("service", ["analyzer", "extractor"])
def test_beyond_the_queue_depth_requests_are_refused_at_once(service: str, tmp_path: Path,
                                                             tiny_model_path: Path) -> None:
    """1 worker and max_queued=2: of 16 slow requests sent together, those that find the queue full
    are answered RESOURCE_EXHAUSTED within a moment, while the admitted ones run to completion."""
    prefix = f"SENSORIUM_{service.upper()}_"
    env = {f"{prefix}WORKERS": "1", f"{prefix}MAX_QUEUED": "2"}
    svc = ServiceProcess(service, tmp_path, {**extractor_env(tiny_model_path), **env} if service == "extractor"
                         else env)
    call = _slow_call(service)
    n = 16
    outcomes: list[tuple[str, float, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def client(index: int) -> None:
        with grpc.insecure_channel(svc.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            start.wait()
            began = time.perf_counter()
            try:
                call(channel, index)
                outcome, details = "ok", ""
            except grpc.RpcError as exc:
                outcome, details = exc.code().name, exc.details() or ""
            with lock:
                outcomes.append((outcome, time.perf_counter() - began, details))

    try:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(client, range(n)))
        alive = svc.proc.poll() is None
    finally:
        svc.stop()
    refused = [o for o in outcomes if o[0] == "RESOURCE_EXHAUSTED"]
    served = [o for o in outcomes if o[0] == "ok"]
    assert alive and len(refused) + len(served) == n, outcomes
    # at most 1 running + 2 waiting when the burst lands; a late arrival may find a freed place
    assert 3 <= len(served) <= 6 and len(refused) >= n - 6, outcomes
    assert all("max_queued=2" in d for _, _, d in refused)
    slowest_refusal, fastest_service = max(t for _, t, _ in refused), min(t for _, t, _ in served)
    assert slowest_refusal < fastest_service, outcomes  # refused without waiting for a worker
    reliability.record("load", f"queue_depth_{service}", {
        "workers": 1, "max_queued": 2, "burst": n, "served": len(served), "refused_resource_exhausted": len(refused),
        "slowest_refusal_ms": round(slowest_refusal * 1000, 1), "fastest_served_ms": round(fastest_service * 1000, 1)})
