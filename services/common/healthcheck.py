"""``python -m services.common.healthcheck [--address HOST:PORT] [--service NAME]``: exit 0 when SERVING.

The container image's HEALTHCHECK. One image runs all three services, so with no ``--service``
the probe asks for the service its container's main process runs (``python -m services.<name>``)
and reads that service's ``SENSORIUM_<NAME>_PORT`` and ``_HOST`` the way the service itself
does. It checks readiness (the service's own name), so ``depends_on: service_healthy`` waits for
a loaded model. Health checks are exempt from the bearer token; TLS is not spoken here.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

# The services' default ports (their settings' ``port`` defaults; a test keeps them equal).
DEFAULT_PORTS = {"analyzer": 50051, "extractor": 50052, "trainer": 50053}
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def service_name(short: str) -> str:
    return f"sensorium.v1.{short.capitalize()}"


def short_name(service: str) -> str:
    """``sensorium.v1.Extractor`` or ``extractor`` -> ``extractor``."""
    short = service.rsplit(".", 1)[-1].lower()
    if short not in DEFAULT_PORTS:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(map(service_name, DEFAULT_PORTS))}")
    return short


def detect_service(cmdline: Path = Path("/proc/1/cmdline")) -> str | None:
    """The service the container's main process runs, from its command line (None if not one of ours)."""
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return None
    for arg in args:
        match = re.fullmatch(rb"services\.(analyzer|extractor|trainer)", arg)
        if match:
            return match.group(1).decode()
    return None


def default_address(short: str, environ: Mapping[str, str] = os.environ) -> str:
    """Where the service listens according to the same environment keys its settings read."""
    prefix = f"SENSORIUM_{short.upper()}_"
    port = environ.get(f"{prefix}PORT") or str(DEFAULT_PORTS[short])
    host = environ.get(f"{prefix}HOST", "127.0.0.1")
    # A wildcard bind is reached over loopback from inside the container.
    host = "127.0.0.1" if host in _WILDCARDS else host
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def check(address: str, service: str, timeout: float) -> tuple[bool, str]:
    """(serving, status text) of ``service`` at ``address``; an unreachable server is not serving."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.common.healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--service", help="sensorium.v1.Analyzer, sensorium.v1.Extractor or sensorium.v1.Trainer "
                                          "(default: the one this container runs)")
    parser.add_argument("--address", help="HOST:PORT (default: from the service's SENSORIUM_<NAME>_HOST/_PORT)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds before giving up (default 3)")
    args = parser.parse_args(argv)
    try:
        short = short_name(args.service) if args.service else detect_service()
    except ValueError as exc:
        parser.error(str(exc))
    if short is None:
        parser.error("no --service given and the main process is not python -m services.<name>")
    address = args.address or default_address(short)
    serving, status = check(address, service_name(short), args.timeout)
    print(f"{service_name(short)} at {address}: {status}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
