"""The three services as local processes: the same entry points the containers run.

``sensorium run`` with no addresses configured starts them here, on free loopback ports, with
their state (model store, adapter store, cache, job database) under one folder so that a second
run finds the adapters and vectors of the first; it stops them at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from sensorium.errors import Unavailable

SERVICES = ("extractor", "trainer", "analyzer")
_SERVICE_NAMES = {"analyzer": "Analyzer", "extractor": "Extractor", "trainer": "Trainer"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(address: str, service: str, timeout: float, alive: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Until ``grpc.health.v1`` says ``service`` is SERVING; a process that exits first is an error."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if alive is not None and alive.poll() is not None:
                tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
                raise Unavailable(f"{service} exited with code {alive.returncode} before it was ready:\n{tail}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise Unavailable(f"{service} at {address} not ready after {timeout:.0f} s")


@dataclass
class ServiceProcess:
    name: str
    address: str
    proc: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_service(name: str, state: Path, env: dict[str, str] | None = None, timeout: float = 120.0,
                  cwd: Path | None = None) -> ServiceProcess:
    """``python -m services.<name>`` on a free loopback port, ready when this returns."""
    port = free_port()
    prefix = f"SENSORIUM_{name.upper()}_"
    state.mkdir(parents=True, exist_ok=True)
    log = state / f"{name}.log"  # beside the service's data folder, state/<name>
    full_env = {**os.environ, f"{prefix}PORT": str(port), f"{prefix}HOST": "127.0.0.1",
                f"{prefix}DATA_DIR": str(state / name), **(env or {})}
    with open(log, "ab") as sink:
        proc = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=full_env, stdout=subprocess.DEVNULL,
                                stderr=sink, cwd=cwd or Path(__file__).resolve().parents[2])
    service = ServiceProcess(name, f"127.0.0.1:{port}", proc, log)
    try:
        wait_ready(service.address, f"sensorium.v1.{_SERVICE_NAMES[name]}", timeout, proc, log)
    except BaseException:
        service.stop()
        raise
    return service


@dataclass
class LocalServices:
    """Extractor, trainer and analyzer sharing one state folder; a context manager that stops them."""

    state: Path
    env: dict[str, str] = field(default_factory=dict)
    running: dict[str, ServiceProcess] = field(default_factory=dict)

    def __enter__(self) -> LocalServices:
        s = self.state
        shared = {"SENSORIUM_EXTRACTOR_MODELS_DIR": str(s / "models"),
                  "SENSORIUM_TRAINER_MODELS_DIR": str(s / "models"),
                  "SENSORIUM_EXTRACTOR_ADAPTERS_DIR": str(s / "adapters"),
                  "SENSORIUM_TRAINER_ADAPTERS_DIR": str(s / "adapters"),
                  "SENSORIUM_EXTRACTOR_CACHE_DIR": str(s / "cache"), **self.env}
        try:
            for name in SERVICES:
                extra = dict(shared)
                if name == "analyzer":
                    extra["SENSORIUM_ANALYZER_EXTRACTOR_ADDRESS"] = self.running["extractor"].address
                self.running[name] = start_service(name, s, extra)
        except BaseException:
            self.stop()
            raise
        return self

    def address(self, name: str) -> str:
        return self.running[name].address

    def stop(self) -> None:
        for name in reversed(SERVICES):
            if name in self.running:
                self.running.pop(name).stop()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
