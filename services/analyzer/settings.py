"""Analyzer settings: environment variables ``SENSORIUM_ANALYZER_*`` or a YAML file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from sensorium.representations import Limits
from services.common.settings import ServiceSettings


class AnalyzerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SENSORIUM_ANALYZER_", extra="forbid")

    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    data_dir: Path = Field(Path("var/analyzer"), description="Where registered ratings tables are stored.")
    max_table_bytes: int = Field(64 << 20, gt=0, description="Largest ratings table accepted, in bytes.")
    max_words: int = Field(12_000, ge=3, description="Most words in one request.")
    max_features: int = Field(65_536, ge=1, description="Most features (columns) per representation.")
    max_models: int = Field(32, ge=1, description="Most models in one request.")
    max_bootstrap: int = Field(10_000, ge=0, description="Most bootstrap resamples in one request.")
    max_bootstrap_words: int = Field(5_000, ge=3, description="Most words in a bootstrapped RSA.")
    max_permutations: int = Field(100_000, ge=0, description="Most permutations in one request.")
    max_dimension_sets: int = Field(64, ge=1, description="Most dimension sets in one request.")
    max_comparisons: int = Field(64, ge=0, description="Most model pairs compared in one request.")
    workers: int = Field(2, ge=1, description="Analyses computed at once; each runs in its own thread.")
    max_queued: int = Field(16, ge=0, description="Analyses waiting for a worker beyond which requests are refused.")

    extractor_address: str = Field("", description="Extractor (host:port) that LayerRsa and LayerProbes read "
                                   "activations from; empty: those RPCs are refused.")
    extractor_token: SecretStr | None = Field(None, description="Bearer token for the extractor, if it needs one.")
    extractor_tls_ca_file: Path | None = Field(None, description="PEM CA that signed the extractor's certificate; "
                                               "enables TLS to the extractor.")
    extractor_tls_cert_file: Path | None = Field(None, description="PEM client certificate presented to the "
                                                 "extractor, for an extractor that requires mutual TLS.")
    extractor_tls_key_file: Path | None = Field(None, description="PEM private key of extractor_tls_cert_file.")
    extractor_timeout_seconds: float = Field(
        600.0, gt=0, description="Longest wait for one extractor call of LayerRsa or LayerProbes (a hung extractor "
                                 "answers UNAVAILABLE after it); a caller's shorter deadline bounds the call too.")

    @model_validator(mode="after")
    def _extractor_client_certificate(self) -> AnalyzerSettings:
        if (self.extractor_tls_cert_file is None) != (self.extractor_tls_key_file is None):
            raise ValueError("extractor_tls_cert_file and extractor_tls_key_file must be given together")
        return self

    def limits(self) -> Limits:
        return Limits(**{k: getattr(self, k) for k in Limits.model_fields})
