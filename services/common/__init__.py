"""Bootstrap shared by the analyzer, extractor and trainer services."""

from services.common.errors import status_for
from services.common.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
    RequestIdInterceptor,
    wrap_handler,
)
from services.common.logging import configure_logging, current_request_id, request_id_var
from services.common.server import RunningServer, build_server, run, serve, start_server
from services.common.settings import ServiceSettings, load_settings, settings_env_table, settings_from_command_line

__all__ = [
    "AuthInterceptor",
    "ErrorInterceptor",
    "MetricsInterceptor",
    "RequestIdInterceptor",
    "RunningServer",
    "ServiceSettings",
    "build_server",
    "configure_logging",
    "current_request_id",
    "load_settings",
    "request_id_var",
    "run",
    "serve",
    "settings_env_table",
    "settings_from_command_line",
    "start_server",
    "status_for",
    "wrap_handler",
]
