"""RSA as a request: several models and dimension sets in one call, with inference.

The human RDM is computed once per (set of valid words, dimension set) and shared by every model
that has the same missing values; bootstrap samples are shared the same way, so the paired
difference of two models uses the very resamples their own intervals used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from sensorium.errors import InvalidArgument
from sensorium.representations import MIN_WORDS, Limits, Representations, check_limit
from sensorium.rsa.compare import Comparison, check_comparison, compare_rdms
from sensorium.rsa.inference import (
    IndexBootstrap,
    feature_reliability,
    noise_ceiling,
    percentile_interval,
    permutation_test,
    renormalized_bootstrap,
    representation_rdm,
    resample_indices,
)
from sensorium.rsa.ranks import doubled_ranks, spearman_from_ranks
from sensorium.rsa.rdm import DISTANCES, Distance


#: ``progress(label, done, total)``: how far a long computation has come.
Progress = Callable[[str, int, int], None]


class RsaOptions(BaseModel):
    distance: Distance = "cosine"
    comparison: Comparison = "spearman"
    zscore: bool = True
    n_bootstrap: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    bootstrap_mode: Literal["index", "renormalize"] = "index"
    n_permutations: int = Field(0, ge=0)
    noise_ceiling: bool = False
    confidence: float = Field(0.95, gt=0.0, lt=1.0)


class DimensionSet(BaseModel):
    name: str = "all"
    features: list[str] = Field(default_factory=list)


class Interval(BaseModel):
    low: float
    high: float


def bootstrap_interval(samples: np.ndarray, confidence: float) -> Interval:
    low, high = percentile_interval(samples, confidence)
    return Interval(low=low, high=high)


class NoiseCeiling(BaseModel):
    lower: float
    upper: float
    feature_reliability: list[float]


class RsaResult(BaseModel):
    model: str
    dimension_set: str
    rsa: float
    n_words: int
    n_dropped: int
    ci: Interval | None = None
    p_value: float | None = None
    noise_ceiling: NoiseCeiling | None = None
    features: list[str]


class RsaDifference(BaseModel):
    model_a: str
    model_b: str
    dimension_set: str
    difference: float
    ci: Interval
    n_words: int
    rsa_a: float
    rsa_b: float


class RsaReport(BaseModel):
    results: list[RsaResult]
    differences: list[RsaDifference] = Field(default_factory=list)
    method: str
    n_bootstrap: int
    seed: int
    n_permutations: int


def describe(options: RsaOptions) -> str:
    text = (f"{options.distance} distance between word vectors"
            f"{' after z-scoring each feature (population SD)' if options.zscore else ''}; "
            f"RDMs compared with {options.comparison}; undefined distances set to 2.0; "
            "words with a missing value dropped per model")
    if options.n_bootstrap:
        scheme = ("word indices resampled into RDMs computed once on the full sample"
                  if options.bootstrap_mode == "index"
                  else "z-scores and RDMs recomputed within each resample")
        text += (f"; {options.n_bootstrap} bootstrap resamples of words (seed {options.seed}), {scheme}, "
                 f"{options.confidence:.0%} percentile intervals")
    if options.n_permutations:
        text += f"; one-sided permutation test with {options.n_permutations} word relabellings"
    return text


def _select(x: np.ndarray, rows: np.ndarray, cols: list[int]) -> np.ndarray:
    """``x[rows][:, cols]``, without a copy when that is all of ``x``."""
    if rows.all() and cols == list(range(x.shape[1])):
        return x
    return x[np.ix_(rows, cols)]


class _Group:
    """Everything computed for one set of valid words and one dimension set.

    At 10,000 words an RDM is 400 MB. Without bootstrap or permutations only the reference's
    ranks are kept and each model's RDM is dropped after its comparison, so the peak stays near
    three RDMs' worth of memory.
    """

    def __init__(self, reps: Representations, rows: np.ndarray, cols: list[int], options: RsaOptions) -> None:
        self.reps, self.rows, self.cols, self.options = reps, rows, cols, options
        self.keep = bool(options.n_bootstrap or options.n_permutations)
        self.human = _select(reps.human, rows, cols)
        self._ref: tuple[np.ndarray, np.ndarray] | None = None
        self._ref_ranks: np.ndarray | None = None
        self.model_rdms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.values: dict[str, float] = {}
        self.samples: dict[str, np.ndarray] = {}
        self._ceiling: NoiseCeiling | None = None

    @property
    def ref(self) -> tuple[np.ndarray, np.ndarray]:
        if self._ref is None:  # computed on first use; dropped to save memory when only ranks are needed
            names = [self.reps.feature_names[c] for c in self.cols]
            self._ref = representation_rdm(self.human, self.options.distance, self.options.zscore, names)
        return self._ref

    def matrix(self, model: str) -> np.ndarray:
        return _select(self.reps.model(model), self.rows, self.cols)

    def rdm(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        if model in self.model_rdms:
            return self.model_rdms[model]
        names = [f"{model}:{self.reps.feature_names[c]}" for c in self.cols]
        rdm = representation_rdm(self.matrix(model), self.options.distance, self.options.zscore, names)
        if self.keep:
            self.model_rdms[model] = rdm
        return rdm

    def rsa(self, model: str) -> float:
        if model not in self.values:
            if self.options.comparison == "spearman":
                if self._ref_ranks is None:
                    self._ref_ranks = doubled_ranks(self.ref[0])
                    if not self.keep:
                        self._ref = None
                self.values[model] = spearman_from_ranks(self._ref_ranks, self.rdm(model)[0])
            else:
                self.values[model] = compare_rdms(self.ref[0], self.rdm(model)[0], self.options.comparison)
        return self.values[model]

    def noise_ceiling(self) -> NoiseCeiling:
        if self._ceiling is None:
            sd = _select(self.reps.human_sd, self.rows, self.cols)
            cnt = _select(self.reps.human_n, self.rows, self.cols)
            o = self.options
            lower, upper = noise_ceiling(self.human, sd, cnt, o.distance, o.zscore, o.comparison, o.seed)
            self._ceiling = NoiseCeiling(lower=lower, upper=upper,
                                         feature_reliability=feature_reliability(self.human, sd, cnt).tolist())
        return self._ceiling

    def bootstrap(self, models: list[str], progress: Progress | None = None, label: str = "") -> None:
        todo = [m for m in models if m not in self.samples]
        if not todo:
            return
        o = self.options
        n = int(self.rows.sum())
        idx = resample_indices(n, o.n_bootstrap, o.seed)
        tick = (lambda k: progress(f"{label}: {', '.join(todo)}", k, o.n_bootstrap)) if progress else None
        if o.bootstrap_mode == "index":
            samples = IndexBootstrap(n, self.ref, [self.rdm(m) for m in todo], o.comparison).run(idx, tick)
        else:
            samples = renormalized_bootstrap(self.human, [self.matrix(m) for m in todo], idx,
                                             o.distance, o.zscore, o.comparison, tick)
        for k, m in enumerate(todo):
            self.samples[m] = samples[:, k]


def run_rsa(reps: Representations, dimension_sets: list[DimensionSet] | None = None,
            comparisons: list[tuple[str, str]] | None = None, options: RsaOptions | None = None,
            limits: Limits | None = None, progress: Progress | None = None) -> RsaReport:
    """RSA of every model against the human data, for every dimension set.

    ``progress(label, done, total)`` is called as bootstrap resamples complete.
    """
    options = options or RsaOptions()
    limits = limits or Limits()
    check_comparison(options.comparison)
    if options.distance not in DISTANCES:
        raise InvalidArgument(f"unknown distance {options.distance!r}")
    reps.check(limits)
    check_limit(options.n_bootstrap, limits.max_bootstrap, "bootstrap resamples", "max_bootstrap")
    check_limit(options.n_permutations, limits.max_permutations, "permutations", "max_permutations")
    if options.n_bootstrap:
        check_limit(len(reps.words), limits.max_bootstrap_words, "words in a bootstrapped RSA", "max_bootstrap_words")
    if not reps.models:
        raise InvalidArgument("no models to compare with the human data")
    comparisons = comparisons or []
    check_limit(len(comparisons), limits.max_comparisons, "model comparisons", "max_comparisons")
    check_limit(len(dimension_sets or []), limits.max_dimension_sets, "dimension sets", "max_dimension_sets")
    for a, b in comparisons:
        reps.model(a), reps.model(b)
        if a == b:
            raise InvalidArgument(f"cannot compare model {a!r} with itself")
    if comparisons and not options.n_bootstrap:
        raise InvalidArgument("model comparisons need a bootstrap (set n_bootstrap, e.g. 200)")
    if options.noise_ceiling and (reps.human_sd is None or reps.human_n is None):
        raise InvalidArgument("the noise ceiling needs human SDs and rater counts")
    sets = dimension_sets or [DimensionSet()]
    if len({s.name for s in sets}) != len(sets):
        raise InvalidArgument("dimension set names must be unique")

    groups: dict[tuple[bytes, str], _Group] = {}

    def group(cols: list[int], set_name: str, *models: str) -> _Group:
        rows = reps.valid_rows(cols, *models)
        if rows.sum() < MIN_WORDS:
            raise InvalidArgument(f"dimension set {set_name!r}: only {int(rows.sum())} words have every value "
                                  f"for {', '.join(models)}; need at least {MIN_WORDS}")
        key = (np.packbits(rows).tobytes(), set_name)
        if key not in groups:
            groups[key] = _Group(reps, rows, cols, options)
        return groups[key]

    results: list[RsaResult] = []
    differences: list[RsaDifference] = []
    for s in sets:
        cols = reps.resolve_features(s.features, s.name)
        names = [reps.feature_names[c] for c in cols]
        model_groups = {m: group(cols, s.name, m) for m in reps.models}
        pair_groups = {(a, b): group(cols, s.name, a, b) for a, b in comparisons}
        if options.n_bootstrap:
            # one bootstrap run per set of valid words, covering every model that needs it there
            needed: dict[int, tuple[_Group, list[str]]] = {}
            for members, g in [((m,), g) for m, g in model_groups.items()] + list(pair_groups.items()):
                todo = needed.setdefault(id(g), (g, []))[1]
                todo.extend(m for m in members if m not in todo)
            for g, todo in needed.values():
                g.bootstrap(todo, progress, f"bootstrap {s.name}")
        for model, g in model_groups.items():
            value = g.rsa(model)
            result = RsaResult(model=model, dimension_set=s.name, rsa=value, n_words=int(g.rows.sum()),
                               n_dropped=len(reps.words) - int(g.rows.sum()), features=names)
            if options.n_bootstrap:
                result.ci = bootstrap_interval(g.samples[model], options.confidence)
            if options.n_permutations:
                result.p_value = permutation_test(g.ref[0], g.rdm(model)[0], result.n_words, value,
                                                  options.comparison, options.n_permutations, options.seed)
            if options.noise_ceiling:
                result.noise_ceiling = g.noise_ceiling()
            results.append(result)
        for (a, b), g in pair_groups.items():
            diff = g.samples[a] - g.samples[b]
            rsa_a, rsa_b = g.rsa(a), g.rsa(b)
            differences.append(RsaDifference(model_a=a, model_b=b, dimension_set=s.name, difference=rsa_a - rsa_b,
                                             ci=bootstrap_interval(diff, options.confidence), n_words=int(g.rows.sum()),
                                             rsa_a=rsa_a, rsa_b=rsa_b))
    return RsaReport(results=results, differences=differences, method=describe(options),
                     n_bootstrap=options.n_bootstrap, seed=options.seed, n_permutations=options.n_permutations)
