"""Layer-wise RSA against a brute-force reference: scipy RDMs per layer, RDM[b][:, b] per resample."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr, zscore

from sensorium.errors import InvalidArgument, ResourceExhausted
from sensorium.representations import Limits, Representations
from sensorium.rsa import DimensionSet, RsaOptions
from sensorium.rsa.inference import percentile_interval, representation_rdm, resample_indices
from sensorium.rsa.layers import layer_rsa

from test_rsa import brute_index_bootstrap

FEATURES = ("visual", "auditory", "haptic", "gustatory", "olfactory", "interoceptive")
N, WIDTH, LAYERS = 40, 12, (0, 2, 3)


def data(seed: int = 0):
    """Human ratings, two models' layers (the second drifting towards the human data), their ratings."""
    rng = np.random.default_rng(seed)
    human = rng.uniform(0, 5, size=(N, len(FEATURES)))
    mix = rng.normal(size=(len(FEATURES), WIDTH))
    acts = {m: {layer: rng.normal(size=(N, WIDTH)) + (k * layer / 2) * human @ mix for layer in LAYERS}
            for k, m in enumerate(("base", "tuned"))}
    ratings = {"base": np.clip(human + rng.normal(0, 2, human.shape), 0, 5),
               "tuned": np.clip(human + rng.normal(0, 0.5, human.shape), 0, 5)}
    words = tuple(f"w{i}" for i in range(N))
    return human, acts, ratings, words


def stream(acts: dict[int, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    yield from sorted(acts.items())


def brute_rsa(human: np.ndarray, x: np.ndarray) -> float:
    """The definition, independently: z-score columns (constant ones to 0), cosine pdist, scipy Spearman."""
    def prep(m: np.ndarray) -> np.ndarray:
        return np.nan_to_num(zscore(m, axis=0))
    return float(spearmanr(pdist(prep(human), "cosine"), pdist(prep(x), "cosine")).statistic)


def test_values_equal_scipy_per_layer_and_dimension_set() -> None:
    human, acts, ratings, words = data()
    reps = Representations(words, FEATURES, human, models=ratings)
    sets = [DimensionSet(name="all"), DimensionSet(name="vis-aud", features=["visual", "auditory"])]
    report = layer_rsa(reps, {m: stream(a) for m, a in acts.items()}, dimension_sets=sets)
    assert report.layers == list(LAYERS) and report.n_words == N and report.n_dropped == 0
    assert len(report.points) == 2 * len(LAYERS) * 2
    for p in report.points:
        cols = [0, 1] if p.dimension_set == "vis-aud" else list(range(len(FEATURES)))
        assert p.rsa == pytest.approx(brute_rsa(human[:, cols], acts[p.model][p.layer]), abs=1e-12)
        assert p.ci is None
    for s in report.summary:
        cols = [0, 1] if s.dimension_set == "vis-aud" else list(range(len(FEATURES)))
        mine = {p.layer: p.rsa for p in report.points if p.model == s.model and p.dimension_set == s.dimension_set}
        assert s.best_layer == max(mine, key=mine.get) and s.best_layer_rsa == mine[s.best_layer]
        assert s.ratings_rsa == pytest.approx(brute_rsa(human[:, cols], ratings[s.model][:, cols]), abs=1e-12)
    tuned = {p.layer: p.rsa for p in report.points if p.model == "tuned" and p.dimension_set == "all"}
    assert tuned[3] > 0.5 > abs({p.layer: p.rsa for p in report.points if p.model == "base"}[3])


def test_intervals_and_layer_differences_equal_the_brute_force_bootstrap() -> None:
    human, acts, ratings, words = data(1)
    reps = Representations(words, FEATURES, human, models={"tuned": ratings["tuned"]})
    options = RsaOptions(n_bootstrap=30, seed=5)
    report = layer_rsa(reps, {m: stream(a) for m, a in acts.items()}, comparisons=[("tuned", "base")],
                       options=options)
    idx = resample_indices(N, 30, 5)
    ref = representation_rdm(human, "cosine", True)

    def samples(x: np.ndarray) -> np.ndarray:
        z = np.nan_to_num(zscore(x, axis=0))
        return brute_index_bootstrap(ref, (pdist(z, "cosine"), np.zeros(N)), idx, "spearman")

    for p in report.points:
        low, high = percentile_interval(samples(acts[p.model][p.layer]), 0.95)
        assert (p.ci.low, p.ci.high) == pytest.approx((low, high), abs=1e-10)
    assert len(report.differences) == len(LAYERS)
    for d in report.differences:
        diff = samples(acts["tuned"][d.layer]) - samples(acts["base"][d.layer])
        low, high = percentile_interval(diff, 0.95)
        assert (d.ci.low, d.ci.high) == pytest.approx((low, high), abs=1e-10)
    top = next(d for d in report.differences if d.layer == 3)
    assert top.ci.low > 0  # the tuned model's top layer is closer to the human RDM, significantly
    (summary,) = [s for s in report.summary if s.model == "tuned"]
    low, high = percentile_interval(brute_index_bootstrap(ref, representation_rdm(ratings["tuned"], "cosine", True),
                                                          idx, "spearman"), 0.95)
    assert (summary.ratings_ci.low, summary.ratings_ci.high) == pytest.approx((low, high), abs=1e-10)
    assert summary.best_layer_ci is not None


def test_words_missing_a_human_value_are_dropped_once_for_every_layer() -> None:
    human, acts, _, words = data(2)
    human[[3, 7], 1] = np.nan
    report = layer_rsa(Representations(words, FEATURES, human), {"base": stream(acts["base"])})
    assert report.n_words == N - 2 and report.n_dropped == 2
    keep = np.ones(N, bool)
    keep[[3, 7]] = False
    p = report.points[-1]
    assert p.rsa == pytest.approx(brute_rsa(human[keep], acts["base"][p.layer][keep]), abs=1e-12)


def test_each_layer_is_read_once_and_released() -> None:
    """The layers are pulled one at a time: the iterator is never ahead of the analysis by more than one."""
    human, acts, _, words = data()
    pulled: list[int] = []

    def lazy() -> Iterator[tuple[int, np.ndarray]]:
        for layer in LAYERS:
            pulled.append(layer)
            yield layer, acts["base"][layer]

    seen = []
    layer_rsa(Representations(words, FEATURES, human), {"base": lazy()},
              progress=lambda label, done, total: seen.append((len(pulled), done)))
    assert seen == [(1, 1), (2, 2), (3, 3)]


def test_bad_requests_are_refused_clearly() -> None:
    human, acts, ratings, words = data()
    reps = Representations(words, FEATURES, human)
    both = lambda: {m: stream(a) for m, a in acts.items()}  # noqa: E731
    cases = [
        (lambda: layer_rsa(reps, {}), "no models"),
        (lambda: layer_rsa(reps, both(), comparisons=[("tuned", "base")]), "need a bootstrap"),
        (lambda: layer_rsa(reps, both(), comparisons=[("tuned", "nope")], options=RsaOptions(n_bootstrap=5)),
         "'nope'"),
        (lambda: layer_rsa(reps, {"base": stream(acts["base"]), "tuned": iter([(0, acts["tuned"][0])])}),
         "fewer layers"),
        (lambda: layer_rsa(reps, {"base": stream(acts["base"]), "tuned": iter([(2, acts["tuned"][2])] * 3)}),
         "not aligned"),
        (lambda: layer_rsa(reps, {"base": iter([(3, acts["base"][3]), (2, acts["base"][2])])}), "ascending"),
        (lambda: layer_rsa(reps, {"base": iter([(0, acts["base"][0][:5])])}), "shape"),
        (lambda: layer_rsa(reps, {"base": iter([(0, np.full((N, WIDTH), np.nan))])}), "NaN"),
        (lambda: layer_rsa(reps, {"base": iter([])}), "no layers"),
        (lambda: layer_rsa(reps, both(), options=RsaOptions(n_permutations=10)), "index bootstrap only"),
        (lambda: layer_rsa(Representations(words, FEATURES, human, models={"other": ratings["base"]}), both()),
         "'other'"),
        (lambda: layer_rsa(reps, both(), dimension_sets=[DimensionSet(name="x", features=["smell"])]), "smell"),
    ]
    for call, needle in cases:
        with pytest.raises(InvalidArgument) as info:
            call()
        assert needle in str(info.value), (needle, str(info.value))
    with pytest.raises(ResourceExhausted, match="max_features"):
        layer_rsa(reps, {"base": stream(acts["base"])}, limits=Limits(max_features=8))
    with pytest.raises(ResourceExhausted, match="max_bootstrap_words"):
        layer_rsa(reps, both(), options=RsaOptions(n_bootstrap=2), limits=Limits(max_bootstrap_words=10))
