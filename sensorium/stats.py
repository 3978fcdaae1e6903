"""Per-dimension and word-wise statistics of the study, each with its independent test reference.

Per dimension: Spearman and Pearson between a model's and the humans' ratings, bootstrap
intervals over words, and Steiger's (1980) z for two models against the same human ratings.
Word-wise: each word's similarity 1 / (1 + Euclidean distance) between its model and human
rating vectors, paired t-tests between models, and the Spearman correlation of two models'
word-wise similarities (which words each model gets right).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, Field
from scipy import stats as sps

from sensorium.errors import InvalidArgument
from sensorium.representations import MIN_WORDS, Limits, Representations, check_limit
from sensorium.rsa.analysis import Interval, bootstrap_interval
from sensorium.rsa.inference import resample_indices


def steiger_z(r_a: float, r_b: float, r_ab: float, n: int) -> tuple[float, float]:
    """Steiger's (1980) z for r(A, H) vs r(B, H) when A and B correlate r_ab, as cocor computes it.

    Returns z and its two-sided p-value; both NaN where the test is undefined (a correlation of
    exactly +-1, which a handful of words can give: Fisher's z is then infinite).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        r_a, r_b, r_ab = np.float64(r_a), np.float64(r_b), np.float64(r_ab)
        z_a, z_b = np.arctanh(r_a), np.arctanh(r_b)
        r_m = (r_a + r_b) / 2.0
        psi = r_ab * (1 - 2 * r_m**2) - 0.5 * r_m**2 * (1 - 2 * r_m**2 - r_ab**2)
        c = psi / (1 - r_m**2) ** 2
        z = (z_a - z_b) * np.sqrt(n - 3) / np.sqrt(2 - 2 * c)
    if not np.isfinite(z):
        return math.nan, math.nan
    return float(z), float(2 * sps.norm.sf(abs(z)))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(sps.spearmanr(a, b).statistic)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(sps.pearsonr(a, b).statistic)


CORRELATIONS = {"spearman": _spearman, "pearson": _pearson}


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row of ``a`` with the same row of ``b``; NaN where either row is constant.

    All bootstrap resamples at once: calling scipy per resample costs about half a millisecond
    each, which made a 1,000-resample request over 11 dimensions take seconds.
    """
    constant = (a == a[:, :1]).all(axis=1) | (b == b[:, :1]).all(axis=1)  # scipy's NaN, not rounding noise
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip((a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1)), -1.0, 1.0)
    r[constant] = np.nan
    return r


def rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair: Pearson r of the rows' average ranks, as scipy computes it."""
    return rowwise_pearson(sps.rankdata(a, axis=1), sps.rankdata(b, axis=1))


class DimensionCorrelation(BaseModel):
    model: str
    feature: str
    spearman: float
    pearson: float
    n_words: int
    spearman_ci: Interval | None = None
    pearson_ci: Interval | None = None


class SteigerTest(BaseModel):
    model_a: str
    model_b: str
    feature: str
    method: str
    r_a: float
    r_b: float
    r_ab: float
    z: float
    p_value: float
    n_words: int


class DimensionsReport(BaseModel):
    correlations: list[DimensionCorrelation]
    steiger: list[SteigerTest] = Field(default_factory=list)


BLOCK_VALUES = 1 << 21  # resampled values per block: about 16 MiB per float64 copy, whatever the request size


def _bootstrap_correlations(m: np.ndarray, h: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman and Pearson of every resample (rows of ``idx``), a block of resamples at a time so
    that memory stays bounded; a resample can make a column constant: its correlation is NaN."""
    block = max(1, BLOCK_VALUES // idx.shape[1])
    rs, rp = [], []
    for first in range(0, len(idx), block):
        rows = idx[first:first + block]
        rs.append(rowwise_spearman(m[rows], h[rows]))
        rp.append(rowwise_pearson(m[rows], h[rows]))
    return np.concatenate(rs), np.concatenate(rp)


def _valid(*columns: np.ndarray) -> np.ndarray:
    ok = np.ones(len(columns[0]), dtype=bool)
    for c in columns:
        ok &= np.isfinite(c)
    return ok


def _check_varies(x: np.ndarray, what: str) -> None:
    if len(x) < MIN_WORDS:
        raise InvalidArgument(f"{what}: only {len(x)} words with values; need at least {MIN_WORDS}")
    if np.all(x == x[0]):
        raise InvalidArgument(f"{what} is constant across its {len(x)} words: its correlation is undefined")


def compare_dimensions(reps: Representations, comparisons: list[tuple[str, str]] | None = None,
                       n_bootstrap: int = 0, seed: int = 0, confidence: float = 0.95,
                       limits: Limits | None = None) -> DimensionsReport:
    limits = limits or Limits()
    reps.check(limits)
    check_limit(n_bootstrap, limits.max_bootstrap, "bootstrap resamples", "max_bootstrap")
    check_limit(len(comparisons or []), limits.max_comparisons, "model comparisons", "max_comparisons")
    if not 0.0 < confidence < 1.0:
        raise InvalidArgument(f"confidence must lie between 0 and 1, got {confidence}")
    if not reps.models:
        raise InvalidArgument("no models to compare with the human data")
    correlations: list[DimensionCorrelation] = []
    for model, matrix in reps.models.items():
        for k, feature in enumerate(reps.feature_names):
            h, m = reps.human[:, k], matrix[:, k]
            ok = _valid(h, m)
            h, m = h[ok], m[ok]
            _check_varies(h, f"human ratings on {feature!r}")
            _check_varies(m, f"model {model!r} on {feature!r}")
            row = DimensionCorrelation(model=model, feature=feature, spearman=_spearman(m, h),
                                       pearson=_pearson(m, h), n_words=int(ok.sum()))
            if n_bootstrap:
                rs, rp = _bootstrap_correlations(m, h, resample_indices(len(h), n_bootstrap, seed))
                row.spearman_ci = bootstrap_interval(rs, confidence)
                row.pearson_ci = bootstrap_interval(rp, confidence)
            correlations.append(row)
    tests: list[SteigerTest] = []
    for a, b in comparisons or []:
        if a == b:
            raise InvalidArgument(f"cannot compare model {a!r} with itself")
        ma, mb = reps.model(a), reps.model(b)
        for k, feature in enumerate(reps.feature_names):
            h, x, y = reps.human[:, k], ma[:, k], mb[:, k]
            ok = _valid(h, x, y)
            h, x, y = h[ok], x[ok], y[ok]
            for what, v in ((f"human ratings on {feature!r}", h), (f"model {a!r} on {feature!r}", x),
                            (f"model {b!r} on {feature!r}", y)):
                _check_varies(v, what)
            for method, corr in CORRELATIONS.items():
                r_a, r_b, r_ab = corr(x, h), corr(y, h), corr(x, y)
                z, p = steiger_z(r_a, r_b, r_ab, int(ok.sum()))
                tests.append(SteigerTest(model_a=a, model_b=b, feature=feature, method=method, r_a=r_a,
                                         r_b=r_b, r_ab=r_ab, z=z, p_value=p, n_words=int(ok.sum())))
    return DimensionsReport(correlations=correlations, steiger=tests)


class WordSimilarity(BaseModel):
    model: str
    mean: float
    sd: float
    n_words: int
    words: list[str] = Field(default_factory=list)
    similarity: list[float] = Field(default_factory=list)


class WordComparison(BaseModel):
    model_a: str
    model_b: str
    mean_difference: float
    t: float
    df: float
    p_value: float
    ranking_spearman: float
    ranking_p_value: float
    n_words: int


class WordsReport(BaseModel):
    similarities: list[WordSimilarity]
    comparisons: list[WordComparison] = Field(default_factory=list)


def word_similarity(model: np.ndarray, human: np.ndarray) -> np.ndarray:
    """1 / (1 + Euclidean distance) between each word's model and human rating vectors (raw scale)."""
    return 1.0 / (1.0 + np.sqrt(((model - human) ** 2).sum(axis=1)))


def compare_words(reps: Representations, comparisons: list[tuple[str, str]] | None = None,
                  include_per_word: bool = False, limits: Limits | None = None) -> WordsReport:
    limits = limits or Limits()
    reps.check(limits)
    check_limit(len(comparisons or []), limits.max_comparisons, "model comparisons", "max_comparisons")
    if not reps.models:
        raise InvalidArgument("no models to compare with the human data")
    sims: dict[str, np.ndarray] = {}
    out: list[WordSimilarity] = []
    for model, matrix in reps.models.items():
        sim = word_similarity(matrix, reps.human)  # NaN where a value is missing
        sims[model] = sim
        ok = np.isfinite(sim)
        if ok.sum() < MIN_WORDS:
            raise InvalidArgument(f"model {model!r}: only {int(ok.sum())} words have every value; need {MIN_WORDS}")
        row = WordSimilarity(model=model, mean=float(sim[ok].mean()), sd=float(sim[ok].std(ddof=1)),
                             n_words=int(ok.sum()))
        if include_per_word:
            row.words = [w for w, keep in zip(reps.words, ok) if keep]
            row.similarity = sim[ok].tolist()
        out.append(row)
    tests: list[WordComparison] = []
    for a, b in comparisons or []:
        if a == b:
            raise InvalidArgument(f"cannot compare model {a!r} with itself")
        reps.model(a), reps.model(b)
        sa, sb = sims[a], sims[b]
        ok = np.isfinite(sa) & np.isfinite(sb)
        sa, sb = sa[ok], sb[ok]
        if len(sa) < MIN_WORDS:
            raise InvalidArgument(f"models {a!r} and {b!r} share only {len(sa)} complete words")
        if np.all(sa - sb == (sa - sb)[0]):
            raise InvalidArgument(f"models {a!r} and {b!r}: the word-wise differences are constant; "
                                  "a paired t-test is undefined")
        t = sps.ttest_rel(sa, sb)
        rho = sps.spearmanr(sa, sb)
        tests.append(WordComparison(model_a=a, model_b=b, mean_difference=float(np.mean(sa - sb)),
                                    t=float(t.statistic), df=float(t.df), p_value=float(t.pvalue),
                                    ranking_spearman=float(rho.statistic), ranking_p_value=float(rho.pvalue),
                                    n_words=len(sa)))
    return WordsReport(similarities=out, comparisons=tests)
