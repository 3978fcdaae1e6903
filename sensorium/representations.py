"""The words, the human ratings and each model's representation of them, checked once.

Every analysis takes a ``Representations``: inline matrices from a client, or columns of a
ratings table. Validation lives here so that each analysis (and each service) sees the same
errors for the same bad input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from sensorium.errors import InvalidArgument, ResourceExhausted
from sensorium.norms import DIMENSION_SETS, canonical_dimension
from sensorium.tables import RatingsTable

MIN_WORDS = 3


class Limits(BaseModel):
    """Request sizes an analyzer accepts; larger requests are refused, not queued."""

    max_words: int = Field(12_000, ge=MIN_WORDS, description="words per request")
    max_features: int = Field(65_536, ge=1, description="features (columns) per representation")
    max_models: int = Field(32, ge=1, description="models per request")
    max_bootstrap: int = Field(10_000, ge=0, description="bootstrap resamples per request")
    max_bootstrap_words: int = Field(5_000, ge=MIN_WORDS, description="words in a bootstrapped RSA")
    max_permutations: int = Field(100_000, ge=0, description="permutations per request")
    max_dimension_sets: int = Field(64, ge=1, description="dimension sets per request")
    max_comparisons: int = Field(64, ge=0, description="model pairs compared per request")


def check_limit(value: int, limit: int, what: str, setting: str) -> None:
    """Refuse a request beyond a configured size, naming the setting that bounds it."""
    if value > limit:
        raise ResourceExhausted(f"request has {value} {what}; the limit is {limit} (setting {setting})")


@dataclass(frozen=True)
class Representations:
    words: tuple[str, ...]
    feature_names: tuple[str, ...]
    human: np.ndarray
    models: dict[str, np.ndarray] = field(default_factory=dict)
    human_sd: np.ndarray | None = None
    human_n: np.ndarray | None = None

    def __post_init__(self) -> None:
        n, f = len(self.words), len(self.feature_names)
        if n < MIN_WORDS:
            raise InvalidArgument(f"need at least {MIN_WORDS} words, got {n}")
        folded: dict[str, int] = {}
        for i, w in enumerate(self.words):
            if not w.strip():
                raise InvalidArgument(f"word {i} is empty")
            if w.casefold() in folded:
                raise InvalidArgument(f"duplicate word {w!r} at positions {folded[w.casefold()]} and {i}")
            folded[w.casefold()] = i
        if f == 0:
            raise InvalidArgument("no features: give at least one human column")
        if len({x.casefold() for x in self.feature_names}) != f:
            raise InvalidArgument(f"duplicate feature names in {list(self.feature_names)[:20]}")
        named = {"human": self.human, **{f"model {k!r}": v for k, v in self.models.items()}}
        if self.human_sd is not None:
            named["human SDs"] = self.human_sd
        if self.human_n is not None:
            named["human rater counts"] = self.human_n
        for what, m in named.items():
            if m.ndim != 2 or m.shape != (n, f):
                raise InvalidArgument(f"{what} has shape {tuple(m.shape)}; expected ({n} words, {f} features)")
            if np.isinf(m).any():
                raise InvalidArgument(f"{what} contains infinite values")
        for name in self.models:
            if not name.strip():
                raise InvalidArgument("a model has an empty name")

    def check(self, limits: Limits) -> None:
        check_limit(len(self.words), limits.max_words, "words", "max_words")
        check_limit(len(self.feature_names), limits.max_features, "features", "max_features")
        check_limit(len(self.models), limits.max_models, "models", "max_models")

    def model(self, name: str) -> np.ndarray:
        try:
            return self.models[name]
        except KeyError:
            raise InvalidArgument(f"no model {name!r} in the request; models are: {', '.join(self.models)}") from None

    def resolve_features(self, features: list[str] | tuple[str, ...], set_name: str = "") -> list[int]:
        """Column indices for a dimension set.

        A feature matches a feature name case-insensitively, or the canonical Lancaster dimension
        the feature name stands for ("Auditory.mean" answers to "auditory"). An empty list under
        the name "all" means every feature; under "sensory" or "motor", those canonical dimensions.
        """
        # name -> first column; dictionaries keep a hostile list of names linear, not quadratic
        folded: dict[str, int] = {}
        canon: dict[str, int] = {}
        for k, x in enumerate(self.feature_names):
            folded.setdefault(x.casefold(), k)
            d = canonical_dimension(x)
            if d is not None:
                canon.setdefault(d, k)
        if not features:
            key = set_name.strip().lower() or "all"
            if key == "all":
                return list(range(len(self.feature_names)))
            if key not in DIMENSION_SETS:
                raise InvalidArgument(f"dimension set {set_name!r} lists no features (and is not one of "
                                      f"{', '.join(DIMENSION_SETS)})")
            idx = [canon[d] for d in DIMENSION_SETS[key] if d in canon]
            if not idx:
                raise InvalidArgument(f"dimension set {set_name!r}: none of {', '.join(DIMENSION_SETS[key])} "
                                      f"is among the features {list(self.feature_names)[:20]}")
            return idx
        if len(features) > len(self.feature_names):
            raise InvalidArgument(f"dimension set {set_name!r} lists {len(features)} dimensions; "
                                  f"there are only {len(self.feature_names)} features")
        out: list[int] = []
        seen: set[int] = set()
        for feat in features:
            key = feat.strip().casefold()
            if key in folded:
                k = folded[key]
            elif key in canon:
                k = canon[key]
            else:
                raise InvalidArgument(f"unknown dimension {feat!r}; features are: {', '.join(self.feature_names[:30])}")
            if k in seen:
                raise InvalidArgument(f"dimension {feat!r} is listed twice in set {set_name!r}")
            seen.add(k)
            out.append(k)
        return out

    @classmethod
    def from_table(cls, table: RatingsTable, human_columns: list[str], models: dict[str, list[str]],
                   sd_columns: list[str] | None = None, n_columns: list[str] | None = None) -> Representations:
        if not human_columns:
            raise InvalidArgument("no human columns given")
        for name, cols in models.items():
            if len(cols) != len(human_columns):
                raise InvalidArgument(f"model {name!r} has {len(cols)} columns but there are "
                                      f"{len(human_columns)} human columns (same order expected)")
        for what, cols in (("SD", sd_columns), ("rater-count", n_columns)):
            if cols and len(cols) != len(human_columns):
                raise InvalidArgument(f"{len(cols)} {what} columns for {len(human_columns)} human columns")
        return cls(
            words=table.words,
            feature_names=tuple(table.resolve(c) for c in human_columns),
            human=table.matrix(human_columns),
            models={name: table.matrix(cols) for name, cols in models.items()},
            human_sd=table.matrix(sd_columns) if sd_columns else None,
            human_n=table.matrix(n_columns) if n_columns else None,
        )

    def valid_rows(self, features: list[int], *models: str) -> np.ndarray:
        """Words with every value present in the human data and in each named model."""
        ok = np.isfinite(self.human[:, features]).all(axis=1)
        for m in models:
            ok &= np.isfinite(self.model(m)[:, features]).all(axis=1)
        return ok
