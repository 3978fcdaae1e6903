"""Bootstrap intervals, permutation tests and noise ceilings for RSA.

The default bootstrap resamples word indices into RDMs computed once on the full sample. A
resample that draws word i ``c_i`` times contains the pair (i, j) ``c_i * c_j`` times and the
pair of word i with itself ``c_i (c_i - 1) / 2`` times, at that word's self-distance. Spearman
over that multiset needs the tie-averaged ranks of weighted values; the values and their tie
groups never change, so one sort up front replaces a sort per resample (``WeightedRanks``).
The result equals recomputing ``RDM[b][:, b]`` and ranking it, to floating-point rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np

from sensorium.errors import InvalidArgument
from sensorium.rsa.compare import Comparison, compare_rdms
from sensorium.rsa.rdm import Distance, calc_rdm, n_pairs, pair_rows, self_distances, zscore
from sensorium.rsa.ranks import WeightedRanks, argsort_packed, rank_average


def resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """Word indices of each bootstrap resample: row r is resample r, drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    finite = samples[np.isfinite(samples)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def representation_rdm(x: np.ndarray, distance: Distance, zscored: bool,
                       feature_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The RDM of one representation and the self-distance of each word, as the study defines them."""
    if zscored:
        x = zscore(x, feature_names)
    return calc_rdm(x, distance), self_distances(x, distance)


class IndexBootstrap:
    """RSA of several models against one reference RDM over bootstrap resamples of words.

    Every RDM is extended by the n self-pairs and laid out in the reference's sorted order once,
    so a resample costs a weighted histogram per RDM instead of a sort.
    """

    def __init__(self, n: int, reference: tuple[np.ndarray, np.ndarray],
                 models: Sequence[tuple[np.ndarray, np.ndarray]], comparison: Comparison) -> None:
        if comparison == "kendall-tau-a":
            raise InvalidArgument("the index bootstrap supports spearman and pearson; "
                                  "use bootstrap mode 'renormalize' for kendall-tau-a")
        self.n = n
        self.comparison = comparison
        ref = np.concatenate(reference)
        self._order = argsort_packed(ref)
        i, j = pair_rows(n, 0, n - 1) if n > 1 else (np.empty(0, np.int32),) * 2
        words = np.arange(n, dtype=np.int32)
        self._i = np.concatenate((i, words))[self._order].astype(np.intp)
        self._j = np.concatenate((j, words))[self._order].astype(np.intp)
        self._self_pos = np.flatnonzero(self._order >= n_pairs(n))
        self._self_word = self._i[self._self_pos]
        self._w = np.empty(len(self._i))
        self._wj = np.empty(len(self._i))
        self._reference = ref[self._order]
        if comparison == "spearman":
            self._reference = WeightedRanks(self._reference)
        self._set_models(models)

    def _set_models(self, models: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        self.n_models = len(models)
        values = [np.concatenate(m)[self._order] for m in models]
        if self.comparison == "spearman":
            self._rankers = [self._reference] + [WeightedRanks(v) for v in values]
        else:
            self._values = [self._reference] + values

    def sharing(self, models: Sequence[tuple[np.ndarray, np.ndarray]]) -> IndexBootstrap:
        """Other models against the same reference: its sorted layout is reused, not redone.

        Why: a layer-wise analysis bootstraps every layer against one human RDM; sorting that
        RDM once instead of once per layer saves a sort of n(n+1)/2 values per layer.
        """
        other = copy.copy(self)
        other._w, other._wj = np.empty(len(self._i)), np.empty(len(self._i))
        other._set_models(models)
        return other

    def _weights(self, counts: np.ndarray) -> np.ndarray:
        w = np.take(counts, self._i, out=self._w)
        w *= np.take(counts, self._j, out=self._wj)
        c = counts[self._self_word]
        w[self._self_pos] = c * (c - 1.0) / 2.0
        return w

    def statistics(self, counts: np.ndarray) -> np.ndarray:
        """RSA of each model for one resample, given how often each word was drawn."""
        w = self._weights(counts.astype(np.float64))
        total = self.n * (self.n - 1) / 2.0  # sum of w: a resample always has n words
        out = np.empty(self.n_models)
        if self.comparison == "spearman":
            mean = (total + 1.0) / 2.0
            r_ref, ss_ref = self._rankers[0].ranks(w)
            wr_ref = w * r_ref
            var_ref = ss_ref - total * mean * mean
            for k, ranker in enumerate(self._rankers[1:]):
                r, ss = ranker.ranks(w)
                cov = float(np.dot(wr_ref, r)) - total * mean * mean
                with np.errstate(invalid="ignore", divide="ignore"):  # a constant RDM: undefined, NaN
                    out[k] = cov / np.sqrt(var_ref * (ss - total * mean * mean))
        else:
            x = self._values[0]
            mx = float(np.dot(w, x)) / total
            wx = w * (x - mx)
            var_x = float(np.dot(wx, x - mx))
            for k, y in enumerate(self._values[1:]):
                my = float(np.dot(w, y)) / total
                with np.errstate(invalid="ignore", divide="ignore"):
                    out[k] = float(np.dot(wx, y - my)) / np.sqrt(var_x * float(np.dot(w, (y - my) ** 2)))
        return out

    def run(self, indices: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """RSA samples, resamples x models."""
        out = np.empty((len(indices), self.n_models))
        for r, idx in enumerate(indices):
            out[r] = self.statistics(np.bincount(idx, minlength=self.n))
            if progress:
                progress(r + 1)
        return out


def renormalized_bootstrap(human: np.ndarray, models: Sequence[np.ndarray], indices: np.ndarray,
                           distance: Distance, zscored: bool, comparison: Comparison,
                           progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The paper notebook's scheme: z-scores and RDMs recomputed inside every resample."""
    out = np.empty((len(indices), len(models)))
    for r, idx in enumerate(indices):
        prep = (lambda x: zscore(x[idx], strict=False)) if zscored else (lambda x: x[idx])
        ref = calc_rdm(prep(human), distance)
        for k, m in enumerate(models):
            out[r, k] = compare_rdms(ref, calc_rdm(prep(m), distance), comparison)
        if progress:
            progress(r + 1)
    return out


def permutation_test(reference: np.ndarray, model: np.ndarray, n_words: int, observed: float,
                     comparison: Comparison, n_permutations: int, seed: int) -> float:
    """One-sided Mantel test: how often relabelling the model's words matches the humans as well.

    p = (1 + #{permuted >= observed}) / (1 + n_permutations). Permuting words leaves the set of
    values (and so the ranks) unchanged, so the model's ranks are computed once and re-indexed.
    """
    if comparison == "kendall-tau-a":
        raise InvalidArgument("the permutation test supports spearman and pearson")
    if comparison == "spearman":
        reference, model = rank_average(reference), rank_average(model)
    ref = reference - reference.mean()
    mod = model - model.mean()
    denom = np.sqrt(np.dot(ref, ref) * np.dot(mod, mod))
    i, j = pair_rows(n_words, 0, n_words - 1)
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(n_permutations):
        perm = rng.permutation(n_words).astype(np.int64)
        a, b = perm[i], perm[j]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        k = lo * n_words - lo * (lo + 1) // 2 + (hi - lo - 1)
        if np.dot(ref, mod[k]) / denom >= observed - 1e-12:
            exceed += 1
    return (1 + exceed) / (1 + n_permutations)


def feature_reliability(means: np.ndarray, sds: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Reliability of each feature's means across words: 1 - mean(SD^2 / N) / Var(means)."""
    error_var = np.nanmean(sds ** 2 / counts, axis=0)
    return 1.0 - error_var / np.nanvar(means, axis=0)


def noise_ceiling(means: np.ndarray, sds: np.ndarray, counts: np.ndarray, distance: Distance,
                  zscored: bool, comparison: Comparison, seed: int,
                  n_simulations: int = 20) -> tuple[float, float]:
    """How well a perfect model could match these human means, given rater noise (SD^2 / N).

    Upper bound: the mean RSA between the observed RDM and RDMs of the means with one more draw of
    rater noise (the observed means' agreement with noise-free ones). Lower bound: the same with
    twice the noise variance (agreement with an independent replication of the norms).
    Rater noise is taken as Gaussian and independent across words and features.
    """
    if np.any(counts <= 0) or np.any(sds < 0):
        raise InvalidArgument("noise ceiling: rater counts must be positive and SDs non-negative")
    rng = np.random.default_rng(seed)
    se = sds / np.sqrt(counts)
    prep = (lambda x: zscore(x, strict=False)) if zscored else (lambda x: x)
    observed = calc_rdm(prep(means), distance)
    bounds = []
    for scale in (1.0, np.sqrt(2.0)):
        sims = [compare_rdms(observed, calc_rdm(prep(means + rng.normal(size=means.shape) * se * scale),
                                                distance), comparison)
                for _ in range(n_simulations)]
        bounds.append(float(np.mean(sims)))
    upper, lower = bounds
    return lower, upper
