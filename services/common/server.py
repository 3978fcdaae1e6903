"""The bootstrap every service runs: interceptors, health, reflection, TLS, metrics, signals.

A service only supplies its settings, a function that adds its servicers, and optionally a
``ready`` coroutine (the extractor loads its model there). Liveness ("" SERVING) is reported as
soon as the port is bound; readiness (the service's own name SERVING) only once ``ready`` is done.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.interceptors import (
    AuthInterceptor,
    DecodeInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
    RequestIdInterceptor,
)
from services.common.logging import configure_logging
from services.common.settings import ServiceSettings

logger = logging.getLogger(__name__)

AddServicers = Callable[[grpc.aio.Server], list[str]]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RunningServer:
    """A started server and what callers need to observe or stop it."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: list[str]
    grace_seconds: float
    metrics_port: int | None = None
    _metrics: WSGIServer | None = field(default=None, repr=False)

    async def mark_ready(self) -> None:
        for name in self.service_names:
            await self.health.set(name, SERVING)

    async def shutdown(self, grace: float | None = None) -> None:
        """Report NOT_SERVING first so load balancers drain us, then let in-flight RPCs finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_seconds if grace is None else grace)
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None


def build_server(
    settings: ServiceSettings, add_servicers: AddServicers
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, list[str]]:
    """Create (not start) the server with interceptors, health and reflection; returns the service names."""
    interceptors: list[grpc.aio.ServerInterceptor] = [RequestIdInterceptor(), MetricsInterceptor()]
    if settings.auth_token is not None:
        interceptors.append(AuthInterceptor(settings.auth_token.get_secret_value()))
    interceptors += [ErrorInterceptor(), DecodeInterceptor()]  # decoding innermost: after auth
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = add_servicers(server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer, names


def _credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    ca = settings.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=ca.read_bytes() if ca is not None else None,
        require_client_auth=ca is not None,
    )


async def start_server(settings: ServiceSettings, add_servicers: AddServicers) -> RunningServer:
    """Bind, start and report liveness; readiness is left to the caller (see ``serve``)."""
    server, health_servicer, names = build_server(settings, add_servicers)
    address = f"{settings.host}:{settings.port}"
    credentials = _credentials(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    for name in names:
        await health_servicer.set(name, NOT_SERVING)
    await server.start()
    running = RunningServer(server, health_servicer, port, names, settings.grace_seconds)
    if settings.metrics_port is not None:
        try:
            running._metrics, _ = prometheus_client.start_http_server(settings.metrics_port, addr=settings.host)
        except OSError:
            await server.stop(0)
            raise
        running.metrics_port = running._metrics.server_address[1]
    logger.info(
        "listening",
        extra={"host": settings.host, "port": port, "tls": credentials is not None,
               "auth": settings.auth_token is not None, "metrics_port": running.metrics_port},
    )
    return running


async def serve(
    settings: ServiceSettings,
    service_name: str,
    add_servicers: AddServicers,
    *,
    ready: Callable[[], Awaitable[None]] | None = None,
    started: asyncio.Event | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run a service until SIGTERM/SIGINT, then drain for ``settings.grace_seconds``.

    ``on_stop`` runs once the server has stopped: background work (the trainer's job runner)
    winds down there, after the last RPC.
    """
    configure_logging(service_name, settings.log_level)
    running = await start_server(settings, add_servicers)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []  # the one shutdown task, referenced until it is done

    def begin_shutdown() -> None:
        if not stopping:
            stopping.append(loop.create_task(running.shutdown()))

    # Signal handlers can only be installed from the main thread; embedded servers stop via shutdown().
    signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    for signum in signals:
        loop.add_signal_handler(signum, begin_shutdown)
    if started is not None:
        started.set()

    async def become_ready() -> None:
        try:
            if ready is not None:
                await ready()
        except Exception:
            logger.exception("service failed to become ready; shutting down")
            begin_shutdown()
            raise
        await running.mark_ready()
        logger.info("ready")

    readiness = asyncio.create_task(become_ready())
    try:
        await running.server.wait_for_termination()
    finally:
        readiness.cancel()
        for signum in signals:
            loop.remove_signal_handler(signum)
        await (stopping[0] if stopping else running.shutdown(0))
        if on_stop is not None:
            await on_stop()
    if readiness.done() and not readiness.cancelled():
        readiness.result()  # re-raise a failed ``ready`` so the process exits non-zero


def run(main: Coroutine[Any, Any, None]) -> None:
    """Entry point for ``python -m services.<name>``: runs ``main`` on a fresh event loop."""
    asyncio.run(main)
