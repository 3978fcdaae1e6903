"""``python -m services.analyzer [--config FILE] [--port N]``: serve the analyzer until SIGTERM."""

from __future__ import annotations

from services.analyzer.servicer import add_servicers
from services.analyzer.settings import AnalyzerSettings
from services.common import run, serve, settings_from_command_line


def main(argv: list[str] | None = None) -> None:
    settings = settings_from_command_line(AnalyzerSettings, "analyzer", argv, __doc__)
    run(serve(settings, "sensorium.v1.Analyzer", add_servicers(settings)))


if __name__ == "__main__":
    main()
