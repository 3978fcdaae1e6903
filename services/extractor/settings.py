"""Extractor settings: environment variables ``SENSORIUM_EXTRACTOR_*`` or a YAML file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from sensorium.models.store import DEFAULT_SPECS, ModelSpec
from services.common.settings import ServiceSettings


class ExtractorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SENSORIUM_EXTRACTOR_", extra="forbid")

    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    data_dir: Path = Field(Path("var/extractor"),
                           description="Parent of the stores below when they are not set one by one.")
    models_dir: Path | None = Field(None, description="Model store (GGUF models converted once); "
                                    "default data_dir/models.")
    cache_dir: Path | None = Field(None, description="Vector cache; default data_dir/cache.")
    adapters_dir: Path = Field(Path("var/adapters"),
                               description="Adapter store the trainer writes; the extractor only reads it.")
    max_loaded_adapters: int = Field(8, ge=1, description="Adapters resident per model; the least recently "
                                     "used is unloaded to make room.")
    models: dict[str, ModelSpec] = Field(
        default_factory=dict,
        description="Models offered besides the embedded default, by name (a JSON object in the environment).")
    prompt_sets: dict[str, Path] = Field(
        default_factory=dict,
        description="Prompt sets by name besides the built-ins: a folder of <dimension>_prompt.txt or "
                    "<language>.yaml files each (a JSON object in the environment).")
    preload: list[str] = Field(default_factory=list,
                               description="Models loaded before the service reports ready; others load on first use.")
    max_words: int = Field(10_000, ge=1, description="Most words in one request.")
    max_word_length: int = Field(64, ge=1, description="Longest word accepted, in characters.")
    max_answer_tokens: int = Field(32, ge=0, description="Most tokens of greedy answer decoded per rating.")
    max_batch_size: int = Field(64, ge=1, description="Most words per forward pass, and the default batch size.")
    cache_max_vectors: int = Field(2_000_000, ge=1,
                                   description="Vectors kept in the cache; the least recently used go first.")
    workers: int = Field(1, ge=1, description="Requests computed at once; each runs in its own thread.")
    max_queued: int = Field(16, ge=0, description="Requests waiting for a worker beyond which requests are refused.")

    @property
    def model_store(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    @property
    def vector_cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.data_dir / "cache"

    @model_validator(mode="after")
    def _models_are_consistent(self) -> ExtractorSettings:
        # A typo would otherwise surface only as a failed readiness, far from the setting.
        misnamed = [k for k, spec in self.models.items() if k != spec.name]
        if misnamed:
            raise ValueError(f"models registered under a name other than their own: {', '.join(misnamed)}")
        unknown = [n for n in self.preload if n not in self.models and n not in DEFAULT_SPECS]
        if unknown:
            raise ValueError(f"preload names unknown models: {', '.join(unknown)}")
        return self
