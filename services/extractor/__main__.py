"""``python -m services.extractor [--config FILE]``: serve the extractor until SIGTERM."""

from __future__ import annotations

import argparse

from services.common import load_settings, run, serve
from services.extractor.servicer import build
from services.extractor.settings import ExtractorSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.extractor", description=__doc__)
    parser.add_argument("--config", help="YAML settings file (also SENSORIUM_EXTRACTOR_CONFIG)")
    parser.add_argument("--port", type=int, help="gRPC port (also SENSORIUM_EXTRACTOR_PORT)")
    args = parser.parse_args(argv)
    overrides = {"port": args.port} if args.port is not None else {}
    settings = load_settings(ExtractorSettings, args.config, **overrides)
    add_servicers, ready = build(settings)
    run(serve(settings, "sensorium.v1.Extractor", add_servicers, ready=ready))


if __name__ == "__main__":
    main()
