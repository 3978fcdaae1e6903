"""Trainer settings: environment variables ``SENSORIUM_TRAINER_*`` or a YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from sensorium.models.store import ModelSpec
from sensorium.training.execute import DataCatalog
from services.common.settings import ServiceSettings


class ChoiceFiles(BaseModel):
    """A multiple-choice item set: PerceptualQA-shaped JSON files, already split."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    train: Path
    test: Path


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SENSORIUM_TRAINER_", extra="forbid")

    port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    data_dir: Path = Field(Path("var/trainer"),
                           description="Job database (jobs.sqlite) and each job's working folder and checkpoints.")
    models_dir: Path | None = Field(None, description="Model store (GGUF models converted once); "
                                    "default data_dir/models. Share it with the extractor.")
    adapters_dir: Path = Field(Path("var/adapters"),
                               description="Adapter store that finished jobs publish to; the extractor reads it.")
    models: dict[str, ModelSpec] = Field(
        default_factory=dict,
        description="Models offered besides the embedded default, by name (a JSON object in the environment).")
    norms: dict[str, str] = Field(
        default_factory=dict,
        description="Norms datasets by name besides the built-in ones: a dataset declaration (.yaml) each.")
    norms_root: Path | None = Field(
        None, description="Folder holding the registered norms datasets' files (one sub-folder each, as the "
                          "shared data/norms); offers them by registry name, e.g. 'italian-repetto2023-ciria'.")
    prompt_sets: dict[str, Path] = Field(
        default_factory=dict,
        description="Prompt sets by name besides the built-ins, as the extractor's: give both the same sets.")
    paper_dir: Path | None = Field(
        None, description="The study's released materials; enables the 'wu2026' split and the 'perceptualqa' items.")
    choice_items: dict[str, ChoiceFiles] = Field(
        default_factory=dict, description="Multiple-choice item sets by name: {train: file, test: file}.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where jobs train; auto: CUDA when present.")
    max_queued_jobs: int = Field(100, ge=1, description="Jobs waiting to run beyond which submissions are refused.")
    max_spec_bytes: int = Field(65_536, ge=256, description="Largest spec accepted, in bytes.")

    @property
    def model_store(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    def catalog(self) -> DataCatalog:
        """The named data a training spec may use: configured norms, item sets and prompt sets."""
        return DataCatalog(norms=self.norms, paper_dir=self.paper_dir,
                           choice_items={k: (v.train, v.test) for k, v in self.choice_items.items()},
                           prompt_sets=self.prompt_sets, norms_root=self.norms_root)

    @model_validator(mode="after")
    def _models_are_consistent(self) -> TrainerSettings:
        misnamed = [k for k, spec in self.models.items() if k != spec.name]
        if misnamed:
            raise ValueError(f"models registered under a name other than their own: {', '.join(misnamed)}")
        return self

