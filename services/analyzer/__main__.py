"""``python -m services.analyzer [--config FILE]``: serve the analyzer until SIGTERM."""

from __future__ import annotations

import argparse

from services.analyzer.servicer import add_servicers
from services.analyzer.settings import AnalyzerSettings
from services.common import load_settings, run, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.analyzer", description=__doc__)
    parser.add_argument("--config", help="YAML settings file (also SENSORIUM_ANALYZER_CONFIG)")
    parser.add_argument("--port", type=int, help="gRPC port (also SENSORIUM_ANALYZER_PORT)")
    args = parser.parse_args(argv)
    overrides = {"port": args.port} if args.port is not None else {}
    settings = load_settings(AnalyzerSettings, args.config, **overrides)
    run(serve(settings, "sensorium.v1.Analyzer", add_servicers(settings)))


if __name__ == "__main__":
    main()
