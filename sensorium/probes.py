"""Linear probes: how much of each human rating can a ridge regression read off one layer's activations?

RSA asks whether two geometries agree; a probe asks whether the information is there at all, in
any linear direction. Every number here is out of sample: words are split into outer folds, and
everything learnt (feature means and SDs, the ridge penalty, the weights) comes from the training
words of a fold only. The penalty is chosen per dimension by exact leave-one-out error, which for
ridge costs one SVD of the training fold for every candidate penalty at once. A control run with
the words' ratings permuted goes through the same folds; if it scores clearly above zero,
something leaks. (It sits slightly below zero, not at it: pooling out-of-fold predictions carries
each fold's intercept, the training words' mean, which moves against the held-out words' mean.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, Field, field_validator
from scipy import stats as sps

from sensorium.errors import InvalidArgument
from sensorium.representations import Representations

#: the permutation of the shuffled control comes from its own stream, not the one the folds use
_SHUFFLE_STREAM = 1


def _default_alphas() -> list[float]:
    return np.logspace(-3, 5, 17).tolist()


class ProbeOptions(BaseModel):
    folds: int = Field(5, ge=2, le=50)
    alphas: list[float] = Field(default_factory=_default_alphas)
    seed: int = Field(0, ge=0)
    standardize: bool = True
    shuffled_control: bool = True

    @field_validator("alphas")
    @classmethod
    def _positive(cls, alphas: list[float]) -> list[float]:
        _check_alphas(alphas, ValueError)
        return alphas


class ProbeScore(BaseModel):
    model: str = ""  # the model (base or adapter) probed, where several are
    layer: int
    dimension: str
    spearman: float
    r2: float
    alpha: float
    n_words: int
    shuffled_spearman: float | None = None
    shuffled_r2: float | None = None


class ProbeReport(BaseModel):
    scores: list[ProbeScore]
    folds: int
    seed: int
    method: str

    def by_layer(self) -> dict[int, float]:
        """The layer profile in one number per layer; NaN if any dimension of the layer was undefined."""
        layers: dict[int, list[float]] = {}
        for s in self.scores:
            layers.setdefault(s.layer, []).append(s.spearman)
        return {layer: float(np.mean(values)) for layer, values in layers.items()}


class ProbesReport(BaseModel):
    """Probes of several models' layers, and optionally of a probe carried to another language's words."""

    scores: list[ProbeScore]
    transfer: list[ProbeScore] = Field(default_factory=list)
    folds: int
    seed: int
    method: str


def describe(options: ProbeOptions) -> str:
    a = options.alphas
    text = (f"ridge regression from each layer's activations to each human dimension, {options.folds}-fold "
            f"cross-validation over words (seed {options.seed}); "
            + ("features z-scored with the training fold's mean and population SD, constant features set to 0; "
               if options.standardize else "features used as they are; ")
            + f"penalty chosen per dimension and fold among {len(a)} values from {min(a):g} to {max(a):g} by exact "
            "leave-one-out error on the training fold (intercept unpenalised); Spearman (ties averaged) and "
            "R^2 = 1 - SS_res/SS_tot on the pooled out-of-fold predictions; words without a rating dropped per "
            "dimension")
    if options.shuffled_control:
        text += "; control: the same folds and procedure with the words' ratings permuted"
    return text


# ---------------------------------------------------------------- checks


def _check_alphas(alphas: Sequence[float], error: type[Exception] = InvalidArgument) -> np.ndarray:
    a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise error("alphas is empty: give at least one ridge penalty")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise error(f"ridge penalties must be finite and positive (the SVD shortcut needs alpha > 0), got {list(a)}")
    return a


def _matrix(a: np.ndarray, what: str) -> np.ndarray:
    """A float64 words x columns matrix; a vector is one column."""
    m = np.asarray(a, dtype=np.float64)
    if m.ndim == 1:
        m = m[:, None]
    if m.ndim != 2:
        raise InvalidArgument(f"{what} must be a words x columns matrix, got shape {np.shape(a)}")
    return m


def _finite(m: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(m)):
        bad = int(np.sum(~np.all(np.isfinite(m), axis=1)))
        raise InvalidArgument(f"{what} has non-finite values in {bad} of its {len(m)} rows")


def _same_rows(x: np.ndarray, y: np.ndarray, xname: str, yname: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise InvalidArgument(f"{xname} has {x.shape[0]} rows (words) but {yname} has {y.shape[0]}")


# ---------------------------------------------------------------- ridge


class _Svd:
    """One SVD of the centred design, from which every penalty's fit and LOO error follow cheaply."""

    def __init__(self, X: np.ndarray, Y: np.ndarray) -> None:
        self.n = X.shape[0]
        self.x_mean, self.y_mean = X.mean(axis=0), Y.mean(axis=0)
        self.Yc = Y - self.y_mean
        self.U, self.s, self.Vt = np.linalg.svd(X - self.x_mean, full_matrices=False)
        self.UtY = self.U.T @ self.Yc
        self.U2 = self.U**2

    def coef(self, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weights for one penalty per column of Y: V diag(s / (s^2 + alpha)) U' Yc."""
        factors = self.s[:, None] / (self.s[:, None] ** 2 + alpha[None, :])
        coef = self.Vt.T @ (factors * self.UtY)
        return coef, self.y_mean - self.x_mean @ coef

    def loo(self, alphas: np.ndarray) -> np.ndarray:
        out = np.empty((len(alphas), self.Yc.shape[1]))
        for k, alpha in enumerate(alphas):
            shrink = self.s**2 / (self.s**2 + alpha)
            h = 1.0 / self.n + self.U2 @ shrink  # < 1 for alpha > 0: U is orthogonal to the constant
            resid = (self.Yc - self.U @ (shrink[:, None] * self.UtY)) / (1.0 - h)[:, None]
            out[k] = np.mean(resid**2, axis=0)
        return out


def ridge_fit(X: np.ndarray, Y: np.ndarray, alpha: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge with an unpenalised intercept, so a rating's offset costs nothing and only its slopes shrink.

    ``alpha`` is one penalty, or one per column of ``Y``. Returns ``(coef [p x d], intercept [d])``.
    """
    X, Y = _matrix(X, "X"), _matrix(Y, "Y")
    _same_rows(X, Y, "X", "Y")
    d = Y.shape[1]
    a = np.asarray(alpha, dtype=np.float64)
    a = _check_alphas(np.full(d, a) if a.ndim == 0 else a)
    if a.size != d:
        raise InvalidArgument(f"{a.size} penalties for {d} columns of Y: give one, or one per column")
    return _Svd(X, Y).coef(a)


def loo_errors(X: np.ndarray, Y: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
    """Mean squared leave-one-out error, ``[len(alphas) x d]``: the inner CV that picks each dimension's penalty.

    Exact, not an approximation: ridge with an unpenalised intercept is a linear smoother whose
    leave-one-out residual is ``(y_i - yhat_i) / (1 - h_ii)``, with
    ``h_ii = 1/n + sum_k U_ik^2 s_k^2 / (s_k^2 + alpha)`` from one SVD of the centred ``X``.
    """
    X, Y = _matrix(X, "X"), _matrix(Y, "Y")
    _same_rows(X, Y, "X", "Y")
    a = _check_alphas(alphas)
    if X.shape[0] < 2:
        raise InvalidArgument(f"leave-one-out needs at least 2 rows, got {X.shape[0]}")
    return _Svd(X, Y).loo(a)


# ---------------------------------------------------------------- cross-validation


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """Each word's outer fold: a seeded shuffle dealt round-robin, so fold sizes differ by at most one."""
    if folds < 2:
        raise InvalidArgument(f"need at least 2 folds, got {folds}")
    if n < folds:
        raise InvalidArgument(f"fewer words ({n}) than folds ({folds}): every fold needs a held-out word")
    ids = np.empty(n, dtype=np.int64)
    ids[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return ids


def _check_fold_sizes(n: int, folds: int, what: str) -> None:
    if n < folds:
        raise InvalidArgument(f"{what}: fewer words ({n}) than folds ({folds}); every fold needs a held-out word")
    smallest = n - -(-n // folds)  # the largest fold is held out
    if smallest < 2:
        raise InvalidArgument(f"{what}: {n} words in {folds} folds leave a training fold of {smallest} word(s); "
                              "leave-one-out inside it needs at least 2")


class _FoldFit(NamedTuple):
    mean: np.ndarray  # [p] training means (zeros without standardizing)
    sd: np.ndarray  # [p] training population SDs, 0 for a constant feature (ones without standardizing)
    coef: np.ndarray  # [p x d] on the standardized scale
    intercept: np.ndarray  # [d]
    alphas: np.ndarray  # [d] the penalty chosen for each column


def _scale(X: np.ndarray, fit: _FoldFit) -> np.ndarray:
    inv = np.divide(1.0, fit.sd, out=np.zeros_like(fit.sd), where=fit.sd > 0)
    return (X - fit.mean) * inv


def _fit_fold(X_train: np.ndarray, Y_train: np.ndarray, options: ProbeOptions) -> _FoldFit:
    """Everything a fold learns, from its training words only: the held-out words never touch it."""
    p = X_train.shape[1]
    if options.standardize:
        mean = X_train.mean(axis=0)
        constant = np.ptp(X_train, axis=0) == 0  # exactly constant: its rounding-error SD must not be inflated
        sd = np.where(constant, 0.0, X_train.std(axis=0))
    else:
        mean, sd = np.zeros(p), np.ones(p)
    fit = _FoldFit(mean, sd, np.empty((p, 0)), np.empty(0), np.empty(0))
    svd = _Svd(_scale(X_train, fit), Y_train)
    grid = _check_alphas(options.alphas)
    chosen = grid[np.argmin(svd.loo(grid), axis=0)]
    coef, intercept = svd.coef(chosen)
    return _FoldFit(mean, sd, coef, intercept, chosen)


def _predict(fit: _FoldFit, X: np.ndarray) -> np.ndarray:
    return _scale(X, fit) @ fit.coef + fit.intercept


def cross_validated_predictions(X: np.ndarray, Y: np.ndarray,
                                options: ProbeOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predictions for every word, ``[n x d]``, and the penalty each fold chose, ``[folds x d]``.

    Columns of ``Y`` are independent problems that share the folds, the standardization and the
    SVD, so predicting several at once costs about as much as predicting one.
    """
    options = options or ProbeOptions()
    X, Y = _matrix(X, "activations"), _matrix(Y, "ratings")
    _same_rows(X, Y, "activations", "ratings")
    _finite(X, "activations")
    _finite(Y, "ratings")
    n, k = X.shape[0], options.folds
    _check_fold_sizes(n, k, "activations")
    ids = fold_ids(n, k, options.seed)
    pred = np.empty_like(Y)
    chosen = np.empty((k, Y.shape[1]))
    for fold in range(k):
        test = ids == fold
        fit = _fit_fold(X[~test], Y[~test], options)
        pred[test] = _predict(fit, X[test])
        chosen[fold] = fit.alphas
    return pred, chosen


# ---------------------------------------------------------------- scores


def _spearman(pred: np.ndarray, y: np.ndarray) -> float:
    """Pearson of average ranks; NaN, quietly, when the predictions do not vary."""
    a, b = sps.rankdata(pred), sps.rankdata(y)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / den) if den > 0 else float("nan")


def _r2(pred: np.ndarray, y: np.ndarray) -> float:
    return float(1.0 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))


def _human(human: np.ndarray, dimensions: Sequence[str], what: str) -> np.ndarray:
    h = _matrix(human, what)
    if h.shape[1] != len(dimensions):
        raise InvalidArgument(f"{what} has {h.shape[1]} columns but {len(dimensions)} dimension names were given")
    if np.any(np.isinf(h)):
        raise InvalidArgument(f"{what} has infinite values; mark a missing rating with NaN")
    return h


def _check_varies(y: np.ndarray, dimension: str, what: str) -> None:
    if len(y) and np.all(y == y[0]):
        raise InvalidArgument(f"{what} on {dimension!r} are constant over their {len(y)} words: R^2 is undefined")


def _groups(*masks: np.ndarray) -> list[tuple[list[int], tuple[np.ndarray, ...]]]:
    """Dimensions that lose the same words share one fit: the results are the same as one at a time."""
    groups: dict[bytes, tuple[list[int], tuple[np.ndarray, ...]]] = {}
    for j in range(masks[0].shape[1]):
        cols = tuple(np.ascontiguousarray(m[:, j]) for m in masks)
        groups.setdefault(b"".join(c.tobytes() for c in cols), ([], cols))[0].append(j)
    return list(groups.values())


def probe_layers(layers: Iterable[tuple[int, np.ndarray]], human: np.ndarray, dimensions: Sequence[str],
                 options: ProbeOptions | None = None) -> ProbeReport:
    """Probe every layer for every dimension, reading the layers one at a time so they need not all fit in memory.

    A word missing a rating on one dimension is dropped for that dimension only. The control
    permutes the ratings among the words that have them (the same permutation for every layer)
    and keeps the folds, so it differs from the real run in nothing but the word-rating pairing.
    """
    options = options or ProbeOptions()
    dims = list(dimensions)
    h = _human(human, dims, "human ratings")
    groups = _groups(~np.isnan(h))
    for cols, (rows,) in groups:
        _check_fold_sizes(int(rows.sum()), options.folds, "human ratings on " + ", ".join(repr(dims[j]) for j in cols))
        for j in cols:
            _check_varies(h[rows, j], dims[j], "human ratings")
    scores: list[ProbeScore] = []
    seen = 0
    for layer, acts in layers:
        seen += 1
        x = _matrix(acts, f"layer {layer} activations")
        _same_rows(x, h, f"layer {layer} activations", "human ratings")
        _finite(x, f"layer {layer} activations")
        layer_scores: dict[int, ProbeScore] = {}
        for cols, (rows,) in groups:
            y = h[np.ix_(rows, cols)]
            n = len(y)
            if options.shuffled_control:
                perm = np.random.default_rng([options.seed, _SHUFFLE_STREAM]).permutation(n)
                y = np.hstack([y, y[perm]])
            pred, chosen = cross_validated_predictions(x[rows], y, options)
            for c, j in enumerate(cols):
                score = ProbeScore(layer=int(layer), dimension=dims[j], spearman=_spearman(pred[:, c], y[:, c]),
                                   r2=_r2(pred[:, c], y[:, c]), alpha=float(np.median(chosen[:, c])), n_words=n)
                if options.shuffled_control:
                    s = c + len(cols)
                    score.shuffled_spearman = _spearman(pred[:, s], y[:, s])
                    score.shuffled_r2 = _r2(pred[:, s], y[:, s])
                layer_scores[j] = score
        scores.extend(layer_scores[j] for j in range(len(dims)))
    if not seen:
        raise InvalidArgument("no layers to probe")
    return ProbeReport(scores=scores, folds=options.folds, seed=options.seed, method=describe(options))


def transfer_probe(layer: int, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   dimensions: Sequence[str], options: ProbeOptions | None = None) -> list[ProbeScore]:
    """Fit on every word of one language, score on another's aligned words: is the direction shared?

    Standardization and the penalty come from the training language alone, so the test language
    only ever sees a finished model. A word missing a rating is dropped, per dimension, on its side.
    """
    options = options or ProbeOptions()
    dims = list(dimensions)
    xa, xb = _matrix(train_x, "training activations"), _matrix(test_x, "test activations")
    ya, yb = _human(train_y, dims, "training ratings"), _human(test_y, dims, "test ratings")
    _same_rows(xa, ya, "training activations", "training ratings")
    _same_rows(xb, yb, "test activations", "test ratings")
    if xa.shape[1] != xb.shape[1]:
        raise InvalidArgument(f"training activations have {xa.shape[1]} features but test activations {xb.shape[1]}")
    _finite(xa, "training activations")
    _finite(xb, "test activations")
    scores: dict[int, ProbeScore] = {}
    for cols, (rows_a, rows_b) in _groups(~np.isnan(ya), ~np.isnan(yb)):
        na, nb = int(rows_a.sum()), int(rows_b.sum())
        if na < 2 or nb < 2:
            names = ", ".join(repr(dims[j]) for j in cols)
            raise InvalidArgument(f"{names}: {na} training and {nb} test words have ratings; need at least 2 each")
        for j in cols:
            _check_varies(yb[rows_b, j], dims[j], "test ratings")
        fit = _fit_fold(xa[rows_a], ya[np.ix_(rows_a, cols)], options)
        pred = _predict(fit, xb[rows_b])
        for c, j in enumerate(cols):
            y = yb[rows_b, j]
            scores[j] = ProbeScore(layer=int(layer), dimension=dims[j], spearman=_spearman(pred[:, c], y),
                                   r2=_r2(pred[:, c], y), alpha=float(fit.alphas[c]), n_words=nb)
    return [scores[j] for j in range(len(dims))]


def probe_models(models: Mapping[str, Mapping[int, np.ndarray]], data: Representations, dimensions: Sequence[str],
                 options: ProbeOptions | None = None,
                 transfer: tuple[Representations, Mapping[str, Mapping[int, np.ndarray]]] | None = None) -> ProbesReport:
    """Every model's layers probed on ``data``'s words; with ``transfer``, each layer's probe fitted on
    all of ``data``'s words is scored on the other words (another language's aligned concepts).

    ``dimensions`` name features of ``data`` (empty: all); the transfer data must have the same
    dimensions, found by name or canonical dimension.
    """
    options = options or ProbeOptions()
    cols = data.resolve_features(list(dimensions), "all")
    dims = [data.feature_names[c] for c in cols]
    human = data.human[:, cols]
    scores = [s.model_copy(update={"model": name}) for name, layers in models.items()
              for s in probe_layers(sorted(layers.items()), human, dims, options).scores]
    moved: list[ProbeScore] = []
    if transfer is not None:
        other, other_models = transfer
        other_human = other.human[:, [other.resolve_features([d], "transfer")[0] for d in dims]]
        for name, layers in models.items():
            for layer, x in sorted(layers.items()):
                if layer not in other_models.get(name, {}):
                    raise InvalidArgument(f"transfer: model {name!r} has no layer {layer} for the other words")
                moved += [t.model_copy(update={"model": name}) for t in transfer_probe(
                    layer, x, human, other_models[name][layer], other_human, dims, options)]
    text = describe(options) + ("; transfer: fitted on every word of the first set, scored on the other"
                                if transfer is not None else "")
    return ProbesReport(scores=scores, transfer=moved, folds=options.folds, seed=options.seed, method=text)
