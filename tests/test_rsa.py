"""RSA against independent references: scipy, brute-force loops over the same resamples."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr, rankdata, spearmanr

from sensorium.errors import InvalidArgument, ResourceExhausted
from sensorium.representations import Limits, Representations
from sensorium.rsa import DimensionSet, RsaOptions, calc_rdm, compare_rdms, kendall_tau_a, run_rsa
from sensorium.rsa.inference import (
    IndexBootstrap,
    feature_reliability,
    percentile_interval,
    renormalized_bootstrap,
    representation_rdm,
    resample_indices,
)
from sensorium.rsa import ranks
from sensorium.rsa.ranks import doubled_ranks, iter_ranks, rank_average, spearman_from_ranks
from sensorium.rsa.rdm import square, zscore


def scipy_rdm(x: np.ndarray, distance: str) -> np.ndarray:
    d = pdist(x, distance)
    d[np.isnan(d)] = 2.0
    # scipy leaves rounding noise (~1e-16) where two rows are identical; their distance is 0
    d[np.abs(d) < 1e-12] = 0.0
    return d


def ratings(rng: np.random.Generator, n: int, f: int, integer: bool) -> np.ndarray:
    x = rng.uniform(0, 5, size=(n, f))
    return np.round(x) if integer else x


@pytest.mark.parametrize("features", [4, 11, 64])
@pytest.mark.parametrize("distance", ["cosine", "correlation", "euclidean"])
def test_rdm_matches_scipy(features: int, distance: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, features))
    x[7] = 0.0  # zero vector: undefined cosine distance -> 2.0
    x[9] = 1.5  # constant row: undefined correlation distance -> 2.0
    assert_allclose(calc_rdm(x, distance), scipy_rdm(x, distance), atol=1e-12)


def test_duplicate_rows_have_exactly_zero_distance() -> None:
    rng = np.random.default_rng(1)
    x = zscore(ratings(rng, 50, 11, integer=True))
    x[10] = x[3]
    d = square(calc_rdm(x, "cosine"))
    assert d[3, 10] == 0.0
    assert np.all(d[np.triu_indices(50, 1)][d[np.triu_indices(50, 1)] != 0] > 1e-12)


def test_constant_column_is_refused_by_name() -> None:
    x = np.random.default_rng(0).normal(size=(10, 3))
    x[:, 1] = 2.0
    with pytest.raises(InvalidArgument, match="'haptic'"):
        zscore(x, ["visual", "haptic", "auditory"])


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("chunk", [7, 1000, 1 << 22])
def test_ranks_match_scipy_with_ties(chunk: int, parallel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # parallel: two half-sorts on two threads merged piece by piece, as above PARALLEL_MIN values
    monkeypatch.setattr(ranks, "PARALLEL_MIN", 10 if parallel else 1 << 40)
    rng = np.random.default_rng(2)
    x = np.round(rng.normal(size=20_000), 1)
    x[:3000] = 0.0  # a tie group longer than a piece, in both halves
    x[-50:] = x.max()
    out = np.empty(len(x))
    for idx, r in iter_ranks(x, chunk=chunk):
        out[idx] = r / 2
    assert_allclose(out, rankdata(x), rtol=0, atol=0)
    assert_allclose(rank_average(x), rankdata(x), rtol=0, atol=0)
    assert doubled_ranks(x).dtype == np.uint32


def test_packed_argsort_orders_exactly_even_for_near_ties() -> None:
    rng = np.random.default_rng(11)
    cases = [
        rng.random(5000),
        np.round(rng.random(50_000), 3),  # many exact ties
        np.r_[rng.random(3000), 0.5 + rng.random(3000) * 1e-13, np.full(50, 0.5)],  # codes collide
        -rng.normal(size=3000),
        np.r_[0.0, 1e-300, 2.0, 1e-16, 2e-16, 2.0],
        np.full(10, 3.0),
    ]
    for x in cases:
        order = ranks.argsort_packed(x)
        assert np.array_equal(x[order], np.sort(x))
        assert np.array_equal(np.sort(order), np.arange(len(x)))


def test_comparisons_match_references() -> None:
    rng = np.random.default_rng(3)
    a = np.round(rng.normal(size=300), 1)
    b = np.round(a + rng.normal(size=300), 0)
    assert compare_rdms(a, b, "spearman") == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman_from_ranks(2 * rankdata(a), b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert compare_rdms(a, b, "pearson") == pytest.approx(pearsonr(a, b).statistic, abs=1e-12)
    # Kendall's tau-a by its definition: sum of sign products over all pairs / (n (n - 1) / 2)
    s = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])
    brute = s[np.triu_indices(300, 1)].sum() / (300 * 299 / 2)
    assert kendall_tau_a(a, b) == pytest.approx(brute, abs=1e-12)
    assert compare_rdms(a, b, "kendall-tau-a") == pytest.approx(brute, abs=1e-12)


def brute_index_bootstrap(ref, model, idx, method):
    """The index definition applied literally: RDM[b][:, b], upper triangle, scipy correlation."""
    sr, sm = square(*ref), square(*model)
    iu = np.triu_indices(idx.shape[1], 1)
    corr = spearmanr if method == "spearman" else pearsonr
    return np.array([corr(sr[np.ix_(b, b)][iu], sm[np.ix_(b, b)][iu]).statistic for b in idx])


@pytest.mark.parametrize("method", ["spearman", "pearson"])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_index_bootstrap_equals_brute_force(method: str, distance: str) -> None:
    rng = np.random.default_rng(4)
    n = 70
    human = ratings(rng, n, 6, integer=False)
    human[5] = human[6]  # tied distances in the reference too
    model = ratings(rng, n, 6, integer=True)  # heavy ties, as parsed model ratings have
    model[11] = model[12]
    ref = representation_rdm(human, distance, True)
    mod = representation_rdm(model, distance, True)
    idx = resample_indices(n, 25, seed=9)
    fast = IndexBootstrap(n, ref, [mod, ref], method).run(idx)
    assert_allclose(fast[:, 0], brute_index_bootstrap(ref, mod, idx, method), atol=1e-12)
    assert_allclose(fast[:, 1], 1.0, atol=1e-12)


def test_index_bootstrap_with_zero_vectors_uses_the_paper_rule() -> None:
    rng = np.random.default_rng(5)
    n = 40
    model = ratings(rng, n, 6, integer=True)
    model[3] = 0.0
    ref = representation_rdm(ratings(rng, n, 6, integer=False), "cosine", False)
    mod = representation_rdm(model, "cosine", False)
    assert mod[1][3] == 2.0
    idx = resample_indices(n, 10, seed=1)
    fast = IndexBootstrap(n, ref, [mod], "spearman").run(idx)[:, 0]
    assert_allclose(fast, brute_index_bootstrap(ref, mod, idx, "spearman"), atol=1e-12)


def test_renormalized_bootstrap_equals_notebook_loop() -> None:
    rng = np.random.default_rng(6)
    human, model = ratings(rng, 50, 5, False), ratings(rng, 50, 5, True)
    idx = resample_indices(50, 8, seed=2)
    fast = renormalized_bootstrap(human, [model], idx, "cosine", True, "spearman")[:, 0]
    z = lambda x: (x - x.mean(0)) / x.std(0)  # noqa: E731
    slow = [spearmanr(scipy_rdm(z(human[b]), "cosine"), scipy_rdm(z(model[b]), "cosine")).statistic for b in idx]
    assert_allclose(fast, slow, atol=1e-12)


def make_reps(rng: np.random.Generator, n: int = 60) -> Representations:
    dims = ["auditory", "gustatory", "haptic", "interoceptive", "olfactory", "visual",
            "foot_leg", "hand_arm", "head", "mouth", "torso"]
    human = ratings(rng, n, 11, False)
    good = np.clip(np.round(human + rng.normal(scale=0.8, size=human.shape)), 0, 5)
    bad = ratings(rng, n, 11, True)
    good[4, 2] = np.nan  # a missing model value drops that word for this model only
    return Representations(words=tuple(f"w{i}" for i in range(n)), feature_names=tuple(f"{d}.mean" for d in dims),
                           human=human, models={"good": good, "bad": bad},
                           human_sd=rng.uniform(0.5, 1.5, size=human.shape),
                           human_n=rng.integers(10, 30, size=human.shape).astype(float))


def test_run_rsa_values_intervals_and_differences() -> None:
    rng = np.random.default_rng(7)
    reps = make_reps(rng)
    options = RsaOptions(n_bootstrap=30, seed=3)
    ticks: list[tuple[str, int, int]] = []
    report = run_rsa(reps, [DimensionSet(name="sensory"), DimensionSet(name="motor"),
                            DimensionSet(name="mine", features=["visual", "Haptic.mean"])],
                     [("good", "bad")], options, progress=lambda *t: ticks.append(t))
    assert ticks[-1][1:] == (30, 30) and "bootstrap mine" in ticks[-1][0]
    by = {(r.model, r.dimension_set): r for r in report.results}
    good = by[("good", "sensory")]
    assert good.n_words == 59 and good.n_dropped == 1
    assert good.features == [f"{d}.mean" for d in ["auditory", "gustatory", "haptic", "interoceptive",
                                                    "olfactory", "visual"]]
    assert by[("good", "mine")].features == ["visual.mean", "haptic.mean"]
    assert by[("bad", "sensory")].n_words == 60
    # the point value, from scipy on the kept words
    keep = np.isfinite(reps.models["good"][:, :6]).all(1)
    z = lambda x: (x - x.mean(0)) / x.std(0)  # noqa: E731
    ref = spearmanr(scipy_rdm(z(reps.human[keep, :6]), "cosine"), scipy_rdm(z(reps.models["good"][keep, :6]), "cosine"))
    assert good.rsa == pytest.approx(ref.statistic, abs=1e-12)
    # the interval, from the brute-force definition on the same resamples
    idx = resample_indices(59, 30, seed=3)
    h = representation_rdm(reps.human[keep, :6], "cosine", True)
    m = representation_rdm(reps.models["good"][keep, :6], "cosine", True)
    low, high = percentile_interval(brute_index_bootstrap(h, m, idx, "spearman"), 0.95)
    assert (good.ci.low, good.ci.high) == pytest.approx((low, high), abs=1e-12)
    # the paired difference uses the words valid for both models and the same resamples
    diff = next(d for d in report.differences if d.dimension_set == "sensory")
    mb = representation_rdm(reps.models["bad"][keep, :6], "cosine", True)
    samples = brute_index_bootstrap(h, m, idx, "spearman") - brute_index_bootstrap(h, mb, idx, "spearman")
    assert (diff.ci.low, diff.ci.high) == pytest.approx(percentile_interval(samples, 0.95), abs=1e-12)
    assert diff.n_words == 59 and diff.difference == pytest.approx(diff.rsa_a - diff.rsa_b)
    assert diff.ci.low > 0, "a noisy copy of the human ratings beats random ratings"
    assert "resampled into RDMs computed once" in report.method


def test_permutation_test_equals_brute_force_loop() -> None:
    rng = np.random.default_rng(8)
    reps = make_reps(rng, n=30)
    report = run_rsa(reps, [DimensionSet(name="motor")], options=RsaOptions(n_permutations=200, seed=5))
    got = {r.model: r.p_value for r in report.results}
    for model in ("good", "bad"):
        keep = np.isfinite(reps.models[model][:, 6:]).all(1)
        z = lambda x: (x - x.mean(0)) / x.std(0)  # noqa: E731
        h = scipy_rdm(z(reps.human[keep, 6:]), "cosine")
        x = z(reps.models[model][keep, 6:])
        observed = spearmanr(h, scipy_rdm(x, "cosine")).statistic
        perm_rng = np.random.default_rng(5)
        hits = 0
        for _ in range(200):
            p = perm_rng.permutation(len(x))
            hits += spearmanr(h, scipy_rdm(x[p], "cosine")).statistic >= observed - 1e-12
        assert got[model] == pytest.approx((1 + hits) / 201)
    assert got["good"] < 0.05 < got["bad"]


def test_noise_ceiling_and_reliability() -> None:
    rng = np.random.default_rng(9)
    reps = make_reps(rng)
    report = run_rsa(reps, options=RsaOptions(noise_ceiling=True, seed=1))
    nc = report.results[0].noise_ceiling
    assert 0 < nc.lower <= nc.upper <= 1
    keep = np.isfinite(reps.models["good"]).all(1)
    mean, sd, cnt = reps.human[keep], reps.human_sd[keep], reps.human_n[keep]
    manual = [1 - np.mean(sd[:, k] ** 2 / cnt[:, k]) / np.var(mean[:, k]) for k in range(11)]
    assert_allclose(nc.feature_reliability, manual)
    assert_allclose(feature_reliability(mean, sd, cnt), manual)


def test_bad_requests_are_refused_clearly() -> None:
    rng = np.random.default_rng(10)
    reps = make_reps(rng, n=20)
    with pytest.raises(InvalidArgument, match="unknown dimension 'smell'"):
        run_rsa(reps, [DimensionSet(name="x", features=["smell"])])
    with pytest.raises(InvalidArgument, match="need a bootstrap"):
        run_rsa(reps, comparisons=[("good", "bad")])
    with pytest.raises(InvalidArgument, match="no model 'nope'"):
        run_rsa(reps, comparisons=[("good", "nope")], options=RsaOptions(n_bootstrap=5))
    with pytest.raises(ResourceExhausted, match="max_words"):
        run_rsa(reps, limits=Limits(max_words=10))
    with pytest.raises(ResourceExhausted, match="max_bootstrap"):
        run_rsa(reps, options=RsaOptions(n_bootstrap=50), limits=Limits(max_bootstrap=10))
    with pytest.raises(ResourceExhausted, match="max_comparisons"):
        run_rsa(reps, comparisons=[("good", "bad")] * 65, options=RsaOptions(n_bootstrap=5))
    with pytest.raises(ResourceExhausted, match="max_dimension_sets"):
        run_rsa(reps, [DimensionSet(name=f"s{i}") for i in range(65)])
    with pytest.raises(InvalidArgument, match="lists 100000 dimensions"):
        run_rsa(reps, [DimensionSet(name="x", features=["visual"] * 100_000)])
    with pytest.raises(InvalidArgument, match="listed twice"):
        run_rsa(reps, [DimensionSet(name="x", features=["visual", "VISUAL.mean"])])
    with pytest.raises(InvalidArgument, match="at least 3 words"):
        Representations(words=("a", "b"), feature_names=("x",), human=np.zeros((2, 1)))
    with pytest.raises(InvalidArgument, match="duplicate word"):
        Representations(words=("a", "b", "A"), feature_names=("x",), human=np.zeros((3, 1)))
    with pytest.raises(InvalidArgument, match="shape"):
        Representations(words=("a", "b", "c"), feature_names=("x",), human=np.zeros((3, 1)),
                        models={"m": np.zeros((4, 1))})
    with pytest.raises(InvalidArgument, match="infinite"):
        Representations(words=("a", "b", "c"), feature_names=("x",), human=np.full((3, 1), np.inf))
    human = rng.normal(size=(5, 2))
    model = rng.normal(size=(5, 2))
    model[:3] = np.nan
    with pytest.raises(InvalidArgument, match="only 2 words"):
        run_rsa(Representations(words=tuple("abcde"), feature_names=("x", "y"), human=human, models={"m": model}))
    const = rng.normal(size=(5, 2))
    const[:, 0] = 1.0
    with pytest.raises(InvalidArgument, match="constant"):
        run_rsa(Representations(words=tuple("abcde"), feature_names=("x", "y"), human=human, models={"m": const}))
