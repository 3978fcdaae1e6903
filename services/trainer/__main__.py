"""``python -m services.trainer [--config FILE] [--port N]``: serve the trainer until SIGTERM."""

from __future__ import annotations

from services.common import run, serve, settings_from_command_line
from services.trainer.servicer import build
from services.trainer.settings import TrainerSettings


def main(argv: list[str] | None = None) -> None:
    settings = settings_from_command_line(TrainerSettings, "trainer", argv, __doc__)
    add_servicers, ready, stop = build(settings)
    run(serve(settings, "sensorium.v1.Trainer", add_servicers, ready=ready, on_stop=stop))


if __name__ == "__main__":
    main()
