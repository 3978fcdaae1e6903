"""``python -m services.extractor [--config FILE] [--port N]``: serve the extractor until SIGTERM."""

from __future__ import annotations

from services.common import run, serve, settings_from_command_line
from services.extractor.servicer import build
from services.extractor.settings import ExtractorSettings


def main(argv: list[str] | None = None) -> None:
    settings = settings_from_command_line(ExtractorSettings, "extractor", argv, __doc__)
    add_servicers, ready = build(settings)
    run(serve(settings, "sensorium.v1.Extractor", add_servicers, ready=ready))


if __name__ == "__main__":
    main()
