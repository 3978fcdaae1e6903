"""Settings shared by every service, read from init kwargs, the environment and a YAML file.

Each service subclasses ``ServiceSettings`` and sets its own ``env_prefix`` (for example
``SENSORIUM_ANALYZER_``), so one deployment can configure several services side by side without
their variables colliding. The YAML file is named by ``<PREFIX>CONFIG`` or passed explicitly.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

# The YAML path is a property of one ``load_settings`` call, not of the class, and
# ``settings_customise_sources`` is a classmethod: a contextvar carries it across.
_config_file_var: ContextVar[str | None] = ContextVar("sensorium_config_file", default=None)

S = TypeVar("S", bound="ServiceSettings")


class ServiceSettings(BaseSettings):
    """Transport, security and observability knobs common to all services."""

    model_config = SettingsConfigDict(env_prefix="SENSORIUM_", extra="forbid")

    host: str = Field("127.0.0.1", description="Interface the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    max_message_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest gRPC message accepted or sent, in bytes."
    )
    auth_token: SecretStr | None = Field(
        None, description="When set, every RPC except health checks needs 'authorization: Bearer <token>'."
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Port of the Prometheus /metrics exporter; unset disables it."
    )
    log_level: str = Field("INFO", description="Minimum level of the JSON log lines on stderr.")
    grace_seconds: float = Field(
        5.0, ge=0, description="How long in-flight RPCs may run after SIGTERM before they are cancelled."
    )
    tls_cert_file: Path | None = Field(None, description="PEM server certificate; enables TLS with the key.")
    tls_key_file: Path | None = Field(None, description="PEM private key of the server certificate.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."
    )

    @field_validator("auth_token")
    @classmethod
    def _token_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token would turn auth on with a secret anyone can send: refuse it, loudly.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("auth_token is empty; unset it to run without auth, or set a real token")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        # A typo here would otherwise silently fall back to logging's default level.
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {value!r}")
        return value.upper()

    @model_validator(mode="after")
    def _tls_files_come_together(self) -> ServiceSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        prefix = settings_cls.model_config.get("env_prefix", "")
        path = _config_file_var.get() or os.environ.get(f"{prefix}CONFIG")
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if path:
            if not Path(path).is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=path),)
        return sources


def load_settings(cls: type[S], config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> S:
    """Build ``cls`` from overrides > environment > YAML (explicit path or ``<PREFIX>CONFIG``) > defaults."""
    token = _config_file_var.set(os.fspath(config_file) if config_file is not None else None)
    try:
        return cls(**overrides)
    finally:
        _config_file_var.reset(token)


def settings_env_table(cls: type[ServiceSettings]) -> list[tuple[str, str, str]]:
    """(environment variable, default, description) per field, so docs can be generated and checked."""
    prefix = cls.model_config.get("env_prefix", "")
    return [
        (f"{prefix}{name}".upper(), repr(field.get_default(call_default_factory=True)), field.description or "")
        for name, field in cls.model_fields.items()
    ]


def settings_from_command_line(cls: type[S], service: str, argv: list[str] | None = None,
                               description: str | None = None) -> S:
    """``python -m services.<service> [--config FILE] [--port N]``: the flags every service takes."""
    import argparse

    prefix = cls.model_config.get("env_prefix", "")
    parser = argparse.ArgumentParser(prog=f"python -m services.{service}", description=description)
    parser.add_argument("--config", help=f"YAML settings file (also {prefix}CONFIG)")
    parser.add_argument("--port", type=int, help=f"gRPC port (also {prefix}PORT)")
    args = parser.parse_args(argv)
    overrides = {"port": args.port} if args.port is not None else {}
    return load_settings(cls, args.config, **overrides)
