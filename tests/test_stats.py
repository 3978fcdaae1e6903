"""Per-dimension and word-wise statistics against scipy and brute-force loops."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import stats as sps

from sensorium.errors import InvalidArgument
from sensorium.representations import Representations
from sensorium.rsa.inference import percentile_interval, resample_indices
from sensorium.stats import compare_dimensions, compare_words, steiger_z, word_similarity


@pytest.fixture
def reps() -> Representations:
    rng = np.random.default_rng(0)
    human = rng.uniform(0, 5, size=(80, 4))
    a = np.clip(human + rng.normal(scale=0.7, size=human.shape), 0, 5)
    b = np.clip(human + rng.normal(scale=2.0, size=human.shape), 0, 5)
    a[3, 1] = np.nan
    return Representations(words=tuple(f"w{i}" for i in range(80)), feature_names=("v", "h", "a", "o"),
                           human=human, models={"a": a, "b": b})


def test_per_dimension_correlations_and_intervals(reps: Representations) -> None:
    report = compare_dimensions(reps, n_bootstrap=40, seed=2)
    row = next(c for c in report.correlations if c.model == "a" and c.feature == "h")
    keep = np.isfinite(reps.models["a"][:, 1])
    h, m = reps.human[keep, 1], reps.models["a"][keep, 1]
    assert row.n_words == 79
    assert row.spearman == pytest.approx(sps.spearmanr(m, h).statistic, abs=1e-12)
    assert row.pearson == pytest.approx(sps.pearsonr(m, h).statistic, abs=1e-12)
    boot = [sps.spearmanr(m[i], h[i]).statistic for i in resample_indices(79, 40, 2)]
    assert (row.spearman_ci.low, row.spearman_ci.high) == pytest.approx(percentile_interval(np.array(boot), 0.95))


def test_steiger_against_an_independent_formula() -> None:
    # Steiger (1980) eq. 15 with the pooled r; written out separately from the library's version
    r12, r13, r23, n = 0.62, 0.41, 0.55, 150
    rbar = (r12 + r13) / 2
    cov = (r23 * (1 - 2 * rbar**2) - 0.5 * rbar**2 * (1 - 2 * rbar**2 - r23**2)) / (1 - rbar**2) ** 2
    z = (np.arctanh(r12) - np.arctanh(r13)) * np.sqrt((n - 3) / (2 - 2 * cov))
    got_z, got_p = steiger_z(r12, r13, r23, n)
    assert got_z == pytest.approx(z, abs=1e-12)
    assert got_p == pytest.approx(2 * (1 - sps.norm.cdf(abs(z))), abs=1e-12)


def test_steiger_sign_and_pairs(reps: Representations) -> None:
    report = compare_dimensions(reps, [("a", "b")])
    assert {t.method for t in report.steiger} == {"spearman", "pearson"}
    assert all(t.z > 0 for t in report.steiger), "the less noisy model correlates better"
    t = next(t for t in report.steiger if t.feature == "h" and t.method == "pearson")
    assert t.n_words == 79


def test_word_similarity_and_comparison(reps: Representations) -> None:
    report = compare_words(reps, [("a", "b")], include_per_word=True)
    a = next(s for s in report.similarities if s.model == "a")
    loop = [1 / (1 + np.sqrt(sum((reps.models["a"][i, k] - reps.human[i, k]) ** 2 for k in range(4))))
            for i in range(80) if i != 3]
    assert_allclose(a.similarity, loop)
    assert a.n_words == 79 and "w3" not in a.words
    assert a.mean == pytest.approx(np.mean(loop)) and a.sd == pytest.approx(np.std(loop, ddof=1))
    sb = word_similarity(reps.models["b"], reps.human)
    keep = np.arange(80) != 3
    d = np.array(loop) - sb[keep]
    c = report.comparisons[0]
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    assert c.t == pytest.approx(t) and c.df == len(d) - 1
    assert c.p_value == pytest.approx(2 * sps.t.sf(abs(t), len(d) - 1))
    assert c.ranking_spearman == pytest.approx(sps.spearmanr(loop, sb[keep]).statistic)


def test_constant_model_column_is_refused(reps: Representations) -> None:
    flat = reps.models["a"].copy()
    flat[:, 2] = 3.0
    bad = Representations(words=reps.words, feature_names=reps.feature_names, human=reps.human, models={"m": flat})
    with pytest.raises(InvalidArgument, match="constant"):
        compare_dimensions(bad)


def test_rowwise_correlations_equal_scipy_row_by_row() -> None:
    """The vectorised bootstrap correlations against scipy, one row at a time: ties, constant rows."""
    import warnings

    from sensorium.stats import rowwise_pearson, rowwise_spearman

    rng = np.random.default_rng(7)
    a = np.round(rng.uniform(0, 5, size=(200, 30)), 1)  # rounding makes ties
    b = np.round(a + rng.normal(scale=1.5, size=a.shape), 1)
    a[3] = 2.5  # a constant resample, as a bootstrap can draw
    b[5] = 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sps.ConstantInputWarning)
        want_s = np.array([sps.spearmanr(x, y).statistic for x, y in zip(a, b)])
        want_p = np.array([sps.pearsonr(x, y).statistic for x, y in zip(a, b)])
    got_s, got_p = rowwise_spearman(a, b), rowwise_pearson(a, b)
    assert np.isnan(got_s[[3, 5]]).all() and np.isnan(got_p[[3, 5]]).all()
    np.testing.assert_allclose(got_s, want_s, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_p, want_p, rtol=0, atol=1e-12)


def test_bootstrap_intervals_do_not_depend_on_the_block_size(reps: Representations,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import sensorium.stats as stats_module

    whole = compare_dimensions(reps, n_bootstrap=50, seed=3)
    monkeypatch.setattr(stats_module, "BLOCK_VALUES", 7 * 79)  # 7 resamples per block, a ragged last one
    assert compare_dimensions(reps, n_bootstrap=50, seed=3) == whole


def test_steiger_is_undefined_not_an_error_when_a_correlation_is_perfect() -> None:
    """Four words can rank perfectly: Fisher's z is infinite, so Steiger's test is NaN (reported as
    undefined), never a crash."""
    assert all(np.isnan(v) for v in steiger_z(1.0, 1.0, 1.0, 4))
    assert all(np.isnan(v) for v in steiger_z(1.0, 0.4, 0.5, 4))
    human = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 4.0], [4.0, 3.0]])
    reps = Representations(words=("a", "b", "c", "d"), feature_names=("x", "y"), human=human,
                           models={"m0": human * 2, "m1": human + 1})
    report = compare_dimensions(reps, [("m0", "m1")])
    assert all(np.isnan(t.z) and np.isnan(t.p_value) for t in report.steiger)
    z, p = steiger_z(0.62, 0.41, 0.55, 150)
    assert np.isfinite(z) and 0 < p < 1
