"""The analyzer as it is deployed: ``python -m services.analyzer`` on a loopback port."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import ROOT, ServiceProcess
from sensorium.client import AnalyzerClient, table_data
from sensorium.representations import Representations
from sensorium.rsa import DimensionSet, RsaOptions, run_rsa
from sensorium.stats import compare_dimensions, compare_words
from sensorium.v1 import analyzer_pb2 as apb
from sensorium.v1 import analyzer_pb2_grpc as apb_grpc
from sensorium.v1 import common_pb2 as cpb


def reps(n: int = 40, seed: int = 0) -> Representations:
    rng = np.random.default_rng(seed)
    human = rng.uniform(0, 5, size=(n, 6))
    return Representations(
        words=tuple(f"word{i}" for i in range(n)),
        feature_names=("Auditory.mean", "Gustatory.mean", "Haptic.mean", "Interoceptive.mean",
                       "Olfactory.mean", "Visual.mean"),
        human=human, models={"ft": np.round(human + rng.normal(size=human.shape)),
                             "base": np.round(rng.uniform(0, 5, size=human.shape))})


@pytest.fixture(scope="module")
def client(analyzer_process: ServiceProcess):
    with AnalyzerClient(analyzer_process.address) as c:
        yield c


def test_health_and_reflection(analyzer_process: ServiceProcess) -> None:
    with grpc.insecure_channel(analyzer_process.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "sensorium.v1.Analyzer"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"sensorium.v1.Analyzer", "grpc.health.v1.Health"} <= names


def test_rsa_over_grpc_equals_in_process(client: AnalyzerClient) -> None:
    r = reps()
    options = RsaOptions(n_bootstrap=50, seed=4, n_permutations=50)
    sets = [DimensionSet(name="sensory"), DimensionSet(name="two", features=["visual", "haptic"])]
    remote = client.rsa(r, sets, [("ft", "base")], options)
    local = run_rsa(r, sets, [("ft", "base")], options)
    assert remote == local
    assert remote.differences[0].ci.low > 0


def test_dimensions_and_words_over_grpc(client: AnalyzerClient) -> None:
    r = reps()
    assert client.dimensions(r, [("ft", "base")], n_bootstrap=20) == compare_dimensions(r, [("ft", "base")], 20)
    assert client.words(r, [("ft", "base")], include_per_word=True) == compare_words(r, [("ft", "base")], True)


def test_tables_by_reference(client: AnalyzerClient, analyzer_process: ServiceProcess) -> None:
    r = reps(seed=1)
    lines = ["Word,aud,gus,hap,int,olf,vis," + ",".join(f"m{i}" for i in range(6))]
    for w, h, m in zip(r.words, r.human, r.models["ft"]):
        lines.append(",".join([w, *map(repr, h.tolist()), *map(repr, m.tolist())]))
    csv = ("\n".join(lines) + "\n").encode()
    info = client.register_table("demo-1", csv, replace=True)
    assert info.n_rows == 40 and info.word_column == "Word"
    assert "demo-1" in {t.name for t in client.list_tables()}
    ref = table_data("demo-1", ["aud", "gus", "hap", "int", "olf", "vis"], {"ft": [f"M{i}" for i in range(6)]})
    got = client.rsa(ref)
    assert got.results[0].rsa == pytest.approx(run_rsa(Representations(
        words=r.words, feature_names=("aud", "gus", "hap", "int", "olf", "vis"), human=r.human,
        models={"ft": r.models["ft"]})).results[0].rsa, abs=1e-12)
    with pytest.raises(grpc.RpcError) as e:
        client.register_table("demo-1", csv)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # damage on disk is detected, never analysed
    stored = next((analyzer_process.log.parent / "analyzer" / "tables").glob("demo-1.*.csv"))
    stored.write_bytes(csv.replace(b"word0", b"wordX"))
    with pytest.raises(grpc.RpcError) as e:
        client.rsa(ref)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "damaged" in e.value.details()
    client.delete_table("demo-1")
    with pytest.raises(grpc.RpcError) as e:
        client.rsa(ref)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def matrix(rows: int, cols: int, data: bytes | None = None) -> cpb.Matrix:
    return cpb.Matrix(rows=rows, cols=cols, dtype=cpb.DTYPE_FLOAT64,
                      data=data if data is not None else np.ones(rows * cols).tobytes())


BAD = {
    "no data": (apb.RsaRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no data"),
    "short bytes": (apb.RsaRequest(data=apb.Representations(inline=apb.InlineRepresentations(
        words=["a", "b", "c"], human=matrix(3, 2, b"\0" * 7)))), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    "two words": (apb.RsaRequest(data=apb.Representations(inline=apb.InlineRepresentations(
        words=["a", "b"], human=matrix(2, 2)))), grpc.StatusCode.INVALID_ARGUMENT, "at least 3 words"),
    "mismatched words": (apb.RsaRequest(data=apb.Representations(inline=apb.InlineRepresentations(
        words=["a", "b", "c"], human=matrix(4, 2), models=[cpb.NamedMatrix(name="m", matrix=matrix(4, 2))]))),
        grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "nan everywhere": (apb.RsaRequest(data=apb.Representations(inline=apb.InlineRepresentations(
        words=["a", "b", "c"], human=matrix(3, 1, np.full(3, np.nan).tobytes()),
        models=[cpb.NamedMatrix(name="m", matrix=matrix(3, 1))]))), grpc.StatusCode.INVALID_ARGUMENT, "only 0 words"),
    "unknown enum": (apb.RsaRequest(data=apb.Representations(inline=apb.InlineRepresentations(
        words=["a", "b", "c"], human=matrix(3, 1), models=[cpb.NamedMatrix(name="m", matrix=matrix(3, 1))])),
        options=apb.RsaOptions(distance=99)), grpc.StatusCode.INVALID_ARGUMENT, "unknown distance"),
    "confidence out of range": (apb.RsaRequest(data=apb.Representations(inline=apb.InlineRepresentations(
        words=["a", "b", "c"], human=matrix(3, 1), models=[cpb.NamedMatrix(name="m", matrix=matrix(3, 1))])),
        options=apb.RsaOptions(confidence=1.5)), grpc.StatusCode.INVALID_ARGUMENT, "confidence"),
    "unknown table": (apb.RsaRequest(data=apb.Representations(table=apb.TableRepresentations(
        table="nope", human_columns=["x"]))), grpc.StatusCode.NOT_FOUND, "not registered"),
    "path-like table": (apb.RsaRequest(data=apb.Representations(table=apb.TableRepresentations(
        table="../../etc/passwd", human_columns=["x"]))), grpc.StatusCode.INVALID_ARGUMENT, "invalid table name"),
    "too many bootstraps": (apb.RsaRequest(data=apb.Representations(inline=apb.InlineRepresentations(
        words=["a", "b", "c"], human=matrix(3, 1), models=[cpb.NamedMatrix(name="m", matrix=matrix(3, 1))])),
        options=apb.RsaOptions(n_bootstrap=10**6)), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_bootstrap"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_clear_status(analyzer_process: ServiceProcess, case: str) -> None:
    request, code, text = BAD[case]
    with grpc.insecure_channel(analyzer_process.address) as ch:
        stub = apb_grpc.AnalyzerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ComputeRsa(request, timeout=30)
        assert e.value.code() == code, e.value.details()
        assert text in e.value.details()
        # and the service keeps serving
        assert stub.ListTables(apb.ListTablesRequest(), timeout=10) is not None
    with pytest.raises(grpc.RpcError) as e:
        AnalyzerClient(analyzer_process.address).register_table("bad", b"Word,x\nfoo,1\nFOO,2\n")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "duplicate word" in e.value.details()


def test_auth_on(tmp_path) -> None:
    svc = ServiceProcess("analyzer", tmp_path, env={"SENSORIUM_ANALYZER_AUTH_TOKEN": "s3cret"})
    try:
        with pytest.raises(grpc.RpcError) as e:
            AnalyzerClient(svc.address).list_tables()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            AnalyzerClient(svc.address, token="wrong").list_tables()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = AnalyzerClient(svc.address, token="s3cret")
        assert ok.list_tables() == []
        assert ok.rsa(reps()).results[0].rsa == pytest.approx(run_rsa(reps()).results[0].rsa)
        with grpc.insecure_channel(svc.address) as ch:  # health needs no token
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        assert svc.stop() == 0


def test_analyzer_starts_without_torch() -> None:
    code = ("import sys, services.analyzer.__main__, services.analyzer.servicer, sensorium.cli;"
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; print(json.dumps(bad))")
    out = subprocess.run([sys.executable, "-c", "import json;" + code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout) == []


def test_undefined_statistics_travel_as_nan(client: AnalyzerClient) -> None:
    # every word has the same model vector: its RDM is constant and the correlation undefined
    r = reps()
    flat = Representations(words=r.words, feature_names=r.feature_names, human=r.human,
                           models={"flat": np.ones_like(r.human), "ft": r.models["ft"]})
    report = client.rsa(flat, options=RsaOptions(zscore=False, n_bootstrap=10))
    got = {x.model: x for x in report.results}
    assert np.isnan(got["flat"].rsa) and np.isnan(got["flat"].ci.low)
    assert np.isfinite(got["ft"].rsa)
    local = {x.model: x for x in run_rsa(flat, options=RsaOptions(zscore=False, n_bootstrap=10)).results}
    assert got["ft"] == local["ft"]


def test_an_undefined_steiger_test_travels_as_nan(client: AnalyzerClient) -> None:
    # four words ranked perfectly by both models: Fisher's z is infinite, the test undefined
    human = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 4.0], [4.0, 3.0]])
    perfect = Representations(words=("a", "b", "c", "d"), feature_names=("x", "y"), human=human,
                              models={"m0": human * 2, "m1": human + 1})
    report = client.dimensions(perfect, [("m0", "m1")], n_bootstrap=5)
    assert report.steiger and all(np.isnan(t.z) and np.isnan(t.p_value) for t in report.steiger)
