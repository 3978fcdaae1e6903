"""The shared service bootstrap, exercised through a real server on a loopback port."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from sensorium import errors
from sensorium.v1 import analyzer_pb2, analyzer_pb2_grpc
from services.common import (
    RunningServer,
    ServiceSettings,
    configure_logging,
    load_settings,
    serve,
    settings_env_table,
    start_server,
    status_for,
)

SERVICE = "sensorium.v1.Analyzer"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TestSettings(ServiceSettings):
    __test__ = False  # a settings class, not a pytest test class
    model_config = SettingsConfigDict(env_prefix="SENSORIUM_TESTSVC_")


class FakeAnalyzer(analyzer_pb2_grpc.AnalyzerServicer):
    async def ListTables(self, request: Any, context: Any) -> analyzer_pb2.ListTablesResponse:
        return analyzer_pb2.ListTablesResponse()

    async def DeleteTable(self, request: Any, context: Any) -> analyzer_pb2.DeleteTableResponse:
        raise errors.NotFound("table 'x' is not registered")

    async def CompareWords(self, request: Any, context: Any) -> analyzer_pb2.WordsResponse:
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("index is still building")
        raise RuntimeError("partial index at /srv/index")

    async def RegisterTable(self, request: Any, context: Any) -> analyzer_pb2.TableInfo:
        raise RuntimeError("secret path /srv/data/tables.db is corrupt")


def add_fake(server: grpc.aio.Server) -> list[str]:
    analyzer_pb2_grpc.add_AnalyzerServicer_to_server(FakeAnalyzer(), server)
    return [SERVICE]


class ServerThread:
    """A server on its own event loop in a background thread, so tests can use blocking stubs."""

    def __init__(self, add: Callable[[grpc.aio.Server], list[str]] = add_fake, **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        settings = {"port": 0, **settings}
        self.running: RunningServer = self.call(start_server(TestSettings(**settings), add))
        self.call(self.running.mark_ready())
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coro: Any, timeout: float = 5) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.running.shutdown(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def plain() -> Iterator[ServerThread]:
    server = ServerThread(metrics_port=0)
    yield server
    server.close()


@pytest.fixture(scope="module")
def secured() -> Iterator[ServerThread]:
    server = ServerThread(auth_token="s3cret")
    yield server
    server.close()


@pytest.fixture
def channel(plain: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(plain.target) as ch:
        yield ch


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buffer = io.StringIO()
    configure_logging("testsvc", "INFO", stream=buffer)
    yield buffer
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def health_of(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_liveness_and_readiness(channel: grpc.Channel) -> None:
    assert health_of(channel, "") == SERVING
    assert health_of(channel, SERVICE) == SERVING


def test_reflection_lists_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_call_without_auth(channel: grpc.Channel) -> None:
    assert analyzer_pb2_grpc.AnalyzerStub(channel).ListTables(analyzer_pb2.ListTablesRequest(), timeout=5) is not None


def test_auth(secured: ServerThread) -> None:
    with grpc.insecure_channel(secured.target) as ch:
        stub = analyzer_pb2_grpc.AnalyzerStub(ch)
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)]:
            with pytest.raises(grpc.RpcError) as info:
                stub.ListTables(analyzer_pb2.ListTablesRequest(), metadata=metadata, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert info.value.details() == "missing or invalid bearer token"
        stub.ListTables(analyzer_pb2.ListTablesRequest(), metadata=(("authorization", "Bearer s3cret"),), timeout=5)
        assert health_of(ch, "") == SERVING


@pytest.mark.parametrize("method", ["/sensorium.v1.Analyzer/ListTables", "/grpc.health.v1.Health/Check",
                                    "/grpc.health.v1.Health/Watch"])
def test_bytes_that_do_not_parse_are_invalid_argument_not_internal(channel: grpc.Channel, method: str) -> None:
    call = (channel.unary_stream if method.endswith("Watch") else channel.unary_unary)(method)
    with pytest.raises(grpc.RpcError) as info:
        reply = call(b"\xff\xff\xff\x0f not a message", timeout=5)
        list(reply) if method.endswith("Watch") else reply
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"the request is not a valid message for {method} (18 bytes that do not parse)"
    assert call(b"", timeout=5) is not None  # the empty message parses: the server is fine


def test_auth_is_checked_before_the_request_is_parsed(secured: ServerThread) -> None:
    with grpc.insecure_channel(secured.target) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary("/sensorium.v1.Analyzer/ListTables")(b"\xff\xff", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_library_error_maps_to_status(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        analyzer_pb2_grpc.AnalyzerStub(channel).DeleteTable(analyzer_pb2.DeleteTableRequest(name="x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "table 'x' is not registered"


def test_status_chosen_by_servicer_is_kept(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        analyzer_pb2_grpc.AnalyzerStub(channel).CompareWords(analyzer_pb2.WordsRequest(), timeout=5)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "index is still building")
    with pytest.raises(grpc.RpcError) as info:  # the health servicer aborts by itself: passes through untouched
        health_of(channel, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_status_for_covers_every_library_error() -> None:
    assert status_for(errors.InvalidArgument("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(errors.AlreadyExists("x")) == grpc.StatusCode.ALREADY_EXISTS
    assert status_for(ValueError("x")) == grpc.StatusCode.INTERNAL
    library = {cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.SensoriumError)}
    assert all(status_for(cls("x")) != grpc.StatusCode.INTERNAL for cls in library - {errors.SensoriumError})


def test_unexpected_error_is_internal_and_logged(channel: grpc.Channel, log_lines: io.StringIO) -> None:
    stub = analyzer_pb2_grpc.AnalyzerStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterTable(analyzer_pb2.RegisterTableRequest(), metadata=(("x-request-id", "req-42"),), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error (request id req-42)"
    assert "secret" not in info.value.details()
    assert ("x-request-id", "req-42") in info.value.trailing_metadata()
    entries = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    (entry,) = [e for e in entries if e.get("request_id") == "req-42"]
    assert entry["level"] == "ERROR" and entry["service"] == "testsvc"
    assert "RuntimeError: secret path" in entry["exc_info"] and entry["time"].endswith("+00:00")


def test_request_id_echoed_or_generated(channel: grpc.Channel) -> None:
    stub = analyzer_pb2_grpc.AnalyzerStub(channel)
    request = analyzer_pb2.ListTablesRequest()
    _, call = stub.ListTables.with_call(request, metadata=(("x-request-id", "abc"),), timeout=5)
    assert ("x-request-id", "abc") in call.trailing_metadata()
    _, call = stub.ListTables.with_call(request, timeout=5)
    generated = dict(call.trailing_metadata())["x-request-id"]
    assert len(generated) == 32 and generated != "abc"


def test_metrics(plain: ServerThread, channel: grpc.Channel) -> None:
    labels = {"service": SERVICE, "method": "DeleteTable", "code": "NOT_FOUND"}
    before = REGISTRY.get_sample_value("sensorium_rpc_requests_total", labels) or 0.0
    with pytest.raises(grpc.RpcError):
        analyzer_pb2_grpc.AnalyzerStub(channel).DeleteTable(analyzer_pb2.DeleteTableRequest(name="x"), timeout=5)
    # abort() sends the status before the interceptors unwind, so the count may land just after the reply.
    for _ in range(100):
        if REGISTRY.get_sample_value("sensorium_rpc_requests_total", labels) == before + 1:
            break
        time.sleep(0.01)
    assert REGISTRY.get_sample_value("sensorium_rpc_requests_total", labels) == before + 1
    url = f"http://127.0.0.1:{plain.running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    assert 'sensorium_rpc_duration_seconds_count{method="DeleteTable",service="sensorium.v1.Analyzer"}' in body


def test_message_size_limit() -> None:
    server = ServerThread(max_message_bytes=1024)
    try:
        with grpc.insecure_channel(server.target) as ch:
            with pytest.raises(grpc.RpcError) as info:
                analyzer_pb2_grpc.AnalyzerStub(ch).RegisterTable(
                    analyzer_pb2.RegisterTableRequest(name="t", csv=b"x" * 4096), timeout=5
                )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.close()


def test_graceful_shutdown_drains_health_watchers() -> None:
    server = ServerThread(grace_seconds=0.2)
    try:
        with grpc.insecure_channel(server.target) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert next(watch).status == SERVING
            stopped = asyncio.run_coroutine_threadsafe(server.running.shutdown(), server.loop)
            assert next(watch).status == NOT_SERVING
            stopped.result(5)
            with pytest.raises(grpc.RpcError) as info:
                health_of(ch, "")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()


def test_settings_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "svc.yaml"
    config.write_text("port: 5001\nhost: 0.0.0.0\nlog_level: debug\n")
    monkeypatch.setenv("SENSORIUM_TESTSVC_CONFIG", str(config))
    monkeypatch.setenv("SENSORIUM_TESTSVC_PORT", "5002")
    settings = load_settings(TestSettings, grace_seconds=1.5)
    assert (settings.host, settings.port, settings.log_level, settings.grace_seconds) == ("0.0.0.0", 5002, "DEBUG", 1.5)
    assert load_settings(TestSettings, port=5003).port == 5003
    monkeypatch.delenv("SENSORIUM_TESTSVC_PORT")
    assert load_settings(TestSettings).port == 5001
    other = tmp_path / "other.yaml"
    other.write_text("port: 5004\n")
    assert load_settings(TestSettings, config_file=other).port == 5004


def test_settings_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("port: 5001\nmax_mesage_bytes: 10\n")
    with pytest.raises(ValidationError, match="max_mesage_bytes"):
        load_settings(TestSettings, config_file=config)
    with pytest.raises(ValidationError, match="together"):
        load_settings(TestSettings, tls_cert_file="cert.pem")
    monkeypatch.setenv("SENSORIUM_TESTSVC_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        load_settings(TestSettings)


def test_settings_env_table_documents_every_field() -> None:
    table = settings_env_table(TestSettings)
    assert [row[0] for row in table] == [f"SENSORIUM_TESTSVC_{name.upper()}" for name in TestSettings.model_fields]
    assert dict((name, default) for name, default, _ in table)["SENSORIUM_TESTSVC_GRACE_SECONDS"] == "5.0"
    assert all(description for _, _, description in table)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_serve_readiness_and_sigterm() -> None:
    """Drives ``serve`` itself in the main thread, where signal handlers can be installed."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    records = _Records()
    root.addHandler(records)

    async def scenario() -> None:
        started, may_become_ready = asyncio.Event(), asyncio.Event()
        settings = TestSettings(port=0, grace_seconds=0.1)
        task = asyncio.create_task(serve(settings, "testsvc", add_fake, ready=may_become_ready.wait, started=started))
        await asyncio.wait_for(started.wait(), 5)
        (listening,) = [r for r in records.records if r.getMessage() == "listening"]
        assert (listening.tls, listening.auth) == (False, False)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listening.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            check = lambda name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)  # noqa: E731
            assert (await check("")).status == SERVING
            assert (await check(SERVICE)).status == NOT_SERVING
            may_become_ready.set()
            for _ in range(100):
                if (await check(SERVICE)).status == SERVING:
                    break
                await asyncio.sleep(0.01)
            assert (await check(SERVICE)).status == SERVING
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 5)

    try:
        asyncio.run(scenario())
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls(tmp_path: Path) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=ca", cwd=tmp_path)
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=tmp_path)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "1",
                 "-days", "1", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=tmp_path)
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    server = ServerThread(tls_cert_file=tmp_path / "server.pem", tls_key_file=tmp_path / "server.key",
                          tls_client_ca_file=tmp_path / "ca.pem")
    try:
        mutual = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
        with grpc.secure_channel(server.target, mutual) as ch:
            assert health_of(ch, "") == SERVING
        with grpc.secure_channel(server.target, grpc.ssl_channel_credentials(read("ca.pem"))) as ch:
            with pytest.raises(grpc.RpcError) as info:
                health_of(ch, "")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()


@pytest.mark.parametrize("token", ["", "   "])
def test_an_empty_auth_token_is_refused_not_taken_as_a_secret(token: str) -> None:
    from pydantic import ValidationError

    from services.analyzer.settings import AnalyzerSettings

    with pytest.raises(ValidationError, match="auth_token is empty"):
        AnalyzerSettings(auth_token=token)


def test_a_refusal_quoting_a_huge_input_still_arrives_as_itself() -> None:
    from services.common.interceptors import MAX_DETAILS

    class Quoting(analyzer_pb2_grpc.AnalyzerServicer):
        async def DeleteTable(self, request: Any, context: Any) -> analyzer_pb2.DeleteTableResponse:
            raise errors.NotFound(f"table {request.name!r} is not registered")

    def add(server: grpc.aio.Server) -> list[str]:
        analyzer_pb2_grpc.add_AnalyzerServicer_to_server(Quoting(), server)
        return [SERVICE]

    server = ServerThread(add)
    try:
        with grpc.insecure_channel(server.target) as ch:
            with pytest.raises(grpc.RpcError) as info:
                analyzer_pb2_grpc.AnalyzerStub(ch).DeleteTable(analyzer_pb2.DeleteTableRequest(name="x" * 100_000),
                                                               timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details().startswith("table 'xxx") and len(info.value.details()) <= MAX_DETAILS
        assert info.value.details().endswith("(100,026 characters)")
    finally:
        server.close()
