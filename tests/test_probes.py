"""Ridge probes against brute-force refits, scipy, and data with a known answer."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import stats as sps

from sensorium import probes
from sensorium.errors import InvalidArgument, validated
from sensorium.probes import (
    ProbeOptions,
    ProbeScore,
    cross_validated_predictions,
    fold_ids,
    loo_errors,
    probe_layers,
    ridge_fit,
    transfer_probe,
)


def brute_ridge(X: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations on ``[1, X]`` with the intercept left out of the penalty: no centring, no SVD."""
    Z = np.hstack([np.ones((len(X), 1)), X])
    P = alpha * np.eye(Z.shape[1])
    P[0, 0] = 0.0
    beta = np.linalg.solve(Z.T @ Z + P, Z.T @ Y)
    return beta[1:], beta[0]


def brute_loo(X: np.ndarray, Y: np.ndarray, alpha: float) -> np.ndarray:
    err = np.zeros(Y.shape[1])
    for i in range(len(X)):
        keep = np.arange(len(X)) != i
        coef, icpt = brute_ridge(X[keep], Y[keep], alpha)
        err += (Y[i] - X[i] @ coef - icpt) ** 2
    return err / len(X)


def planted(n: int, p: int, d: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) * rng.uniform(0.5, 3.0, size=p) + rng.normal(size=p)
    W = rng.normal(size=(p, d)) / np.sqrt(p)
    Y = (X - X.mean(0)) / X.std(0) @ W + noise * rng.normal(size=(n, d))
    return X, Y, W


def same(a: ProbeScore, b: ProbeScore) -> bool:
    """Equal up to rounding: fitting columns together or apart changes the BLAS summation order."""
    x, y = a.model_dump(), b.model_dump()
    close = [x[k] == pytest.approx(y[k], rel=1e-12) if isinstance(x[k], float) else x[k] == y[k] for k in x]
    return x.keys() == y.keys() and all(close)


def test_ridge_fit_matches_the_normal_equations() -> None:
    rng = np.random.default_rng(1)
    for n, p in [(40, 6), (10, 25)]:  # over- and under-determined
        X, Y = rng.normal(size=(n, p)) + 3.0, rng.normal(size=(n, 3)) + 5.0
        for alpha in [1e-3, 0.7, 50.0]:
            coef, icpt = ridge_fit(X, Y, alpha)
            want_coef, want_icpt = brute_ridge(X, Y, alpha)
            assert_allclose(coef, want_coef, rtol=1e-8, atol=1e-10)
            assert_allclose(icpt, want_icpt, rtol=1e-8, atol=1e-10)
    coef, _ = ridge_fit(X, Y, np.array([0.1, 1.0, 10.0]))  # one penalty per column
    assert_allclose(coef[:, 2], brute_ridge(X, Y[:, 2:], 10.0)[0][:, 0], rtol=1e-8)


def test_loo_errors_match_refitting_without_each_row() -> None:
    rng = np.random.default_rng(2)
    alphas = [1e-3, 0.1, 3.0, 1e3]
    for n, p in [(25, 5), (12, 20)]:
        X, Y = rng.normal(size=(n, p)), rng.normal(size=(n, 3))
        got = loo_errors(X, Y, alphas)
        assert got.shape == (len(alphas), 3)
        for k, alpha in enumerate(alphas):
            want = np.zeros(3)
            for i in range(n):
                keep = np.arange(n) != i
                coef, icpt = ridge_fit(X[keep], Y[keep], alpha)
                want += (Y[i] - X[i] @ coef - icpt) ** 2
            assert_allclose(got[k], want / n, rtol=1e-8)


def test_fold_ids_are_seeded_and_balanced() -> None:
    ids = fold_ids(23, 5, 3)
    assert sorted(np.bincount(ids)) == [4, 4, 5, 5, 5]
    assert np.array_equal(ids, fold_ids(23, 5, 3))
    assert not np.array_equal(ids, fold_ids(23, 5, 4))


def test_cross_validated_predictions_match_explicit_loops() -> None:
    X, Y, _ = planted(30, 8, 2, 0.5, seed=3)
    options = ProbeOptions(folds=3, alphas=np.logspace(-2, 3, 6).tolist(), seed=7)
    pred, chosen = cross_validated_predictions(X, Y, options)
    ids = fold_ids(30, 3, 7)
    want_pred, want_chosen = np.empty_like(Y), np.empty((3, 2))
    for fold in range(3):
        tr, te = ids != fold, ids == fold
        mu, sd = X[tr].mean(0), X[tr].std(0)
        Ztr, Zte = (X[tr] - mu) / sd, (X[te] - mu) / sd
        errors = np.array([brute_loo(Ztr, Y[tr], a) for a in options.alphas])
        for j in range(2):
            alpha = options.alphas[int(np.argmin(errors[:, j]))]
            coef, icpt = brute_ridge(Ztr, Y[tr, j:j + 1], alpha)
            want_pred[te, j] = (Zte @ coef + icpt)[:, 0]
            want_chosen[fold, j] = alpha
    assert_allclose(chosen, want_chosen)
    assert_allclose(pred, want_pred, rtol=1e-8, atol=1e-10)


def test_planted_signal_is_found_and_noise_and_the_control_are_not() -> None:
    X, Y, _ = planted(200, 50, 2, 0.4, seed=4)
    noise = np.random.default_rng(5).normal(size=(200, 1))
    report = probe_layers([(0, X)], np.hstack([Y, noise]), ["a", "b", "noise"])
    by_dim = {s.dimension: s for s in report.scores}
    for name in ["a", "b"]:
        s = by_dim[name]
        assert s.spearman > 0.8 and s.r2 > 0.6
        assert abs(s.shuffled_spearman) < 0.2 and s.shuffled_r2 < 0.1
        assert 1e-3 <= s.alpha <= 1e5
    assert abs(by_dim["noise"].spearman) < 0.25
    assert "5-fold" in report.method and report.folds == 5


def test_a_fold_learns_from_its_training_words_only(monkeypatch: pytest.MonkeyPatch) -> None:
    X, Y, _ = planted(40, 6, 2, 0.5, seed=6)
    X[:, 0] *= 1e3  # scales that standardizing must undo, with training statistics
    options = ProbeOptions(folds=4, seed=2)
    ids = fold_ids(40, 4, 2)
    seen: list[np.ndarray] = []
    real = probes._fit_fold

    def spy(X_train: np.ndarray, Y_train: np.ndarray, opts: ProbeOptions) -> probes._FoldFit:
        seen.append(X_train.copy())
        return real(X_train, Y_train, opts)

    monkeypatch.setattr(probes, "_fit_fold", spy)
    pred, _ = cross_validated_predictions(X, Y, options)
    assert len(seen) == 4
    for fold, X_train in enumerate(seen):
        assert np.array_equal(X_train, X[ids != fold]), "held-out words must not reach the fit"
        fit = real(X_train, Y[ids != fold], options)
        assert_allclose(fit.mean, X[ids != fold].mean(0))
        assert_allclose(fit.sd, X[ids != fold].std(0))
        te = ids == fold
        assert_allclose(pred[te], (X[te] - fit.mean) / fit.sd @ fit.coef + fit.intercept, rtol=1e-10)

    # the held-out words of fold 0, however wild, leave fold 0's predictions as its training words made them
    X2, Y2 = X.copy(), Y.copy()
    te = ids == 0
    X2[te] = X2[te] * 30.0 + 100.0
    Y2[te] = -Y2[te] * 1e3
    pred2, _ = cross_validated_predictions(X2, Y2, options)
    fit0 = real(X[ids != 0], Y[ids != 0], options)
    assert_allclose(pred2[te], (X2[te] - fit0.mean) / fit0.sd @ fit0.coef + fit0.intercept, rtol=1e-10)


def test_constant_features_are_zeroed_not_divided_by_zero() -> None:
    X, Y, _ = planted(30, 4, 1, 0.5, seed=7)
    X = np.hstack([X, np.full((30, 1), 0.1)])
    fit = probes._fit_fold(X, Y, ProbeOptions())
    assert fit.sd[-1] == 0.0 and fit.coef[-1, 0] == 0.0
    X_test = X.copy()
    X_test[:, -1] = 5.0
    assert_allclose(probes._predict(fit, X_test), probes._predict(fit, X))


def test_missing_ratings_drop_words_per_dimension() -> None:
    X, Y, _ = planted(60, 10, 2, 0.5, seed=8)
    options = ProbeOptions(folds=3, shuffled_control=False)
    holes = Y.copy()
    holes[[1, 5, 9, 30], 0] = np.nan
    report = probe_layers([(2, X)], holes, ["a", "b"], options)
    a, b = report.scores
    assert (a.n_words, b.n_words) == (56, 60)
    assert a.shuffled_spearman is None and a.shuffled_r2 is None
    full = probe_layers([(2, X)], Y, ["a", "b"], options)
    assert same(b, full.scores[1]), "a hole in one dimension must not change another"
    keep = ~np.isnan(holes[:, 0])
    alone = probe_layers([(2, X[keep])], Y[keep, :1], ["a"], options)
    assert same(a, alone.scores[0])


def test_bad_inputs_are_invalid_arguments() -> None:
    X, Y, _ = planted(20, 4, 2, 0.5, seed=9)
    with pytest.raises(InvalidArgument, match="rows"):
        probe_layers([(0, X[:-1])], Y, ["a", "b"])
    with pytest.raises(InvalidArgument, match="columns"):
        probe_layers([(0, X)], Y, ["a"])
    with pytest.raises(InvalidArgument, match="fewer words"):
        cross_validated_predictions(X[:4], Y[:4], ProbeOptions(folds=5))
    with pytest.raises(InvalidArgument, match="fewer words"):
        probe_layers([(0, X)], np.where(np.arange(20)[:, None] < 17, np.nan, Y), ["a", "b"])
    bad = X.copy()
    bad[3, 1] = np.inf
    with pytest.raises(InvalidArgument, match="non-finite"):
        probe_layers([(0, bad)], Y, ["a", "b"])
    with pytest.raises(InvalidArgument, match="constant"):
        probe_layers([(0, X)], np.hstack([Y[:, :1], np.ones((20, 1))]), ["a", "b"])
    with pytest.raises(InvalidArgument, match="empty"):
        loo_errors(X, Y, [])
    with pytest.raises(InvalidArgument, match="positive"):
        ridge_fit(X, Y, 0.0)
    with pytest.raises(InvalidArgument, match="alphas"):
        validated(ProbeOptions, alphas=[])
    with pytest.raises(InvalidArgument, match="positive"):
        validated(ProbeOptions, alphas=[1.0, -2.0])
    with pytest.raises(InvalidArgument, match="no layers"):
        probe_layers([], Y, ["a", "b"])


def test_scores_are_spearman_and_r2_of_the_pooled_predictions() -> None:
    X, Y, _ = planted(80, 12, 1, 1.0, seed=10)
    Y = np.round(Y * 2) / 2  # ties, which Spearman must average
    options = ProbeOptions(folds=4, seed=3)
    (score,) = probe_layers([(1, X)], Y, ["a"], options).scores
    pred, chosen = cross_validated_predictions(X, Y, options)
    y, yhat = Y[:, 0], pred[:, 0]
    assert score.spearman == pytest.approx(sps.spearmanr(yhat, y).statistic, abs=1e-12)
    assert score.r2 == pytest.approx(1 - np.sum((y - yhat) ** 2) / np.sum((y - y.mean()) ** 2), abs=1e-12)
    assert score.alpha == np.median(chosen[:, 0])
    perm = np.random.default_rng([3, 1]).permutation(80)
    shuffled, _ = cross_validated_predictions(X, Y[perm], options)
    assert score.shuffled_spearman == pytest.approx(sps.spearmanr(shuffled[:, 0], Y[perm, 0]).statistic, abs=1e-12)


def test_transfer_between_languages() -> None:
    rng = np.random.default_rng(11)
    W = rng.normal(size=(30, 2))
    xa, xb = rng.normal(size=(150, 30)), rng.normal(size=(120, 30))
    ya = xa @ W + 0.5 * rng.normal(size=(150, 2))
    yb = xb @ W + 0.5 * rng.normal(size=(120, 2))
    yb[0, 1] = np.nan
    same = transfer_probe(4, xa, ya, xb, yb, ["a", "b"])
    assert [s.dimension for s in same] == ["a", "b"] and all(s.layer == 4 for s in same)
    assert [s.n_words for s in same] == [120, 119]
    assert all(s.spearman > 0.8 and s.r2 > 0.6 and s.shuffled_spearman is None for s in same)
    V = rng.normal(size=(30, 2))
    V -= W @ np.linalg.lstsq(W, V, rcond=None)[0]  # orthogonal to both true directions: no shared signal at all
    other = xb @ V + 0.5 * rng.normal(size=(120, 2))
    unrelated = transfer_probe(4, xa, ya, xb, other, ["a", "b"])
    assert all(abs(s.spearman) < 0.25 for s in unrelated)


def test_layers_are_read_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    X, Y, _ = planted(40, 6, 2, 0.5, seed=12)
    rng = np.random.default_rng(13)
    events: list[str] = []
    real = probes.cross_validated_predictions

    def spy(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        events.append("fit")
        return real(*args, **kwargs)

    def layers() -> Iterator[tuple[int, np.ndarray]]:
        for layer in range(3):
            events.append(f"layer {layer}")
            yield layer, X + layer * rng.normal(size=X.shape)

    monkeypatch.setattr(probes, "cross_validated_predictions", spy)
    report = probe_layers(layers(), Y, ["a", "b"], ProbeOptions(folds=3))
    assert events == ["layer 0", "fit", "layer 1", "fit", "layer 2", "fit"]
    assert [(s.layer, s.dimension) for s in report.scores] == [(k, d) for k in range(3) for d in "ab"]
    profile = report.by_layer()
    assert list(profile) == [0, 1, 2]
    for k in range(3):
        assert profile[k] == pytest.approx(np.mean([s.spearman for s in report.scores if s.layer == k]))
    assert profile[0] > profile[2], "noise added to later layers hides the signal"
