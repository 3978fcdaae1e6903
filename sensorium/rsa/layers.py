"""Layer-wise RSA: every layer's activations against the human RDM, for several models at once.

The question behind it: does fine-tuning reorganise what a network holds inside, or only how it
answers? So each model (the base, each adapter) is read layer by layer, and the same words'
ratings, where given, are set beside the best layer.

Cost: a layer's RDM is computed once per model and serves every dimension set (the human RDM is
the one that changes with the set, and it is ranked once up front). Layers are consumed one at
a time from iterators, so at no point are two layers' RDMs of one model held: at 5,000 words a
layer's RDM is 100 MB and its activations are the only other large thing. Bootstrap resamples
are the same for every layer and model, so a difference between two models at one layer, and the
comparison between layers, use the very same resamples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from sensorium.errors import InvalidArgument
from sensorium.representations import MIN_WORDS, Limits, Representations, check_limit
from sensorium.rsa.analysis import DimensionSet, Interval, Progress, RsaOptions, bootstrap_interval, describe
from sensorium.rsa.compare import check_comparison, compare_rdms
from sensorium.rsa.inference import IndexBootstrap, representation_rdm, resample_indices
from sensorium.rsa.ranks import doubled_ranks, spearman_from_ranks
from sensorium.rsa.rdm import DISTANCES, calc_rdm, self_distances, zscore

#: one model's layers, in order: (layer index, words x width activations)
Layers = Iterable[tuple[int, np.ndarray]]


class LayerPoint(BaseModel):
    model: str
    layer: int
    dimension_set: str
    rsa: float
    ci: Interval | None = None


class LayerDifference(BaseModel):
    """rsa(model_a) - rsa(model_b) at one layer, with a paired bootstrap interval."""

    model_a: str
    model_b: str
    layer: int
    dimension_set: str
    difference: float
    ci: Interval


class BehaviourVsLayers(BaseModel):
    """A model's ratings (behaviour) and its best layer (inside), against the same human RDM and words."""

    model: str
    dimension_set: str
    best_layer: int
    best_layer_rsa: float
    best_layer_ci: Interval | None = None
    ratings_rsa: float | None = None  # None when no ratings were given for the model
    ratings_ci: Interval | None = None


class LayerRsaReport(BaseModel):
    points: list[LayerPoint]
    differences: list[LayerDifference]
    summary: list[BehaviourVsLayers]
    layers: list[int]
    n_words: int
    n_dropped: int  # words dropped for a missing human value in a feature of any dimension set
    method: str
    from_cache: int = 0  # (word, layer) vectors an extractor served from its cache, when it was the source


@dataclass
class _Set:
    name: str
    cols: list[int]
    ref: tuple[np.ndarray, np.ndarray] | None  # kept for the bootstrap only
    ranks: np.ndarray | None  # doubled ranks of the reference, for Spearman
    bootstrap: IndexBootstrap | None = None


def layer_rsa(human: Representations, models: Mapping[str, Layers], *,
              dimension_sets: list[DimensionSet] | None = None, comparisons: list[tuple[str, str]] | None = None,
              options: RsaOptions | None = None, limits: Limits | None = None,
              progress: Progress | None = None) -> LayerRsaReport:
    """RSA of every layer of every model against the human data, per dimension set.

    ``human`` carries the words, the human ratings and, optionally, each model's ratings under
    the model's name (``human.models``): those give the behavioural RSA beside the best layer.
    ``models`` maps a model name to its layers in ascending order; every model must yield the
    same layers. The activation matrices are compared as whole vectors (a layer has no
    dimensions); the dimension set selects the human features, and the same features of the
    ratings. Z-scoring, when on, standardises each activation unit over the words.
    """
    options = options or RsaOptions()
    limits = limits or Limits()
    check_comparison(options.comparison)
    if options.distance not in DISTANCES:
        raise InvalidArgument(f"unknown distance {options.distance!r}")
    if options.bootstrap_mode != "index" or options.n_permutations or options.noise_ceiling:
        raise InvalidArgument("layer-wise RSA supports the index bootstrap only: no renormalize mode, "
                              "permutations or noise ceiling (ask ComputeRsa for those on one layer)")
    human.check(limits)
    if not models:
        raise InvalidArgument("no models: give at least one model's layers")
    check_limit(len(models), limits.max_models, "models", "max_models")
    comparisons = comparisons or []
    check_limit(len(comparisons), limits.max_comparisons, "model comparisons", "max_comparisons")
    for a, b in comparisons:
        for m in (a, b):
            if m not in models:
                raise InvalidArgument(f"comparison names model {m!r}; models are: {', '.join(models)}")
        if a == b:
            raise InvalidArgument(f"cannot compare model {a!r} with itself")
    if comparisons and not options.n_bootstrap:
        raise InvalidArgument("model comparisons need a bootstrap (set n_bootstrap, e.g. 200)")
    check_limit(options.n_bootstrap, limits.max_bootstrap, "bootstrap resamples", "max_bootstrap")
    for name in human.models:
        if name not in models:
            raise InvalidArgument(f"ratings are given for {name!r}, which has no layers; models are: "
                                  f"{', '.join(models)}")
    sets_given = dimension_sets or [DimensionSet()]
    check_limit(len(sets_given), limits.max_dimension_sets, "dimension sets", "max_dimension_sets")
    if len({s.name for s in sets_given}) != len(sets_given):
        raise InvalidArgument("dimension set names must be unique")
    columns = [human.resolve_features(s.features, s.name) for s in sets_given]

    # the words: those with every human value any set needs (activations have no gaps)
    used = sorted({c for cols in columns for c in cols})
    rows = ~np.isnan(human.human[:, used]).any(axis=1)
    n = int(rows.sum())
    if n < MIN_WORDS:
        raise InvalidArgument(f"only {n} words have every human value the dimension sets need; need {MIN_WORDS}")
    if options.n_bootstrap:
        check_limit(n, limits.max_bootstrap_words, "words in a bootstrapped RSA", "max_bootstrap_words")
    keep = bool(options.n_bootstrap)
    sets: list[_Set] = []
    for s, cols in zip(sets_given, columns, strict=True):
        ref = representation_rdm(human.human[np.ix_(rows, cols)], options.distance, options.zscore,
                                 [human.feature_names[c] for c in cols])
        ranks = doubled_ranks(ref[0]) if options.comparison == "spearman" else None
        sets.append(_Set(s.name, cols, ref if keep or ranks is None else None, ranks))
    resamples = resample_indices(n, options.n_bootstrap, options.seed) if keep else None

    def rsa_of(st: _Set, rdm: tuple[np.ndarray, np.ndarray]) -> float:
        if st.ranks is not None:
            return spearman_from_ranks(st.ranks, rdm[0])
        assert st.ref is not None
        return compare_rdms(st.ref[0], rdm[0], options.comparison)

    def bootstrap(st: _Set, rdms: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Samples [resamples, models]; the first call lays out the reference, later ones share it."""
        assert st.ref is not None and resamples is not None
        st.bootstrap = st.bootstrap.sharing(rdms) if st.bootstrap else \
            IndexBootstrap(n, st.ref, rdms, options.comparison)
        return st.bootstrap.run(resamples)

    names = list(models)
    points: list[LayerPoint] = []
    differences: list[LayerDifference] = []
    samples: dict[tuple[str, str, int], np.ndarray] = {}
    layers: list[int] = []
    for layer, mats in _zip_layers(models, len(human.words), limits):
        layers.append(layer)
        rdms = [_activation_rdm(mats[m][rows], options) for m in names]
        del mats
        for st in sets:
            values = [rsa_of(st, r) for r in rdms]
            boot = bootstrap(st, rdms) if keep else None
            for k, m in enumerate(names):
                point = LayerPoint(model=m, layer=layer, dimension_set=st.name, rsa=values[k])
                if boot is not None:
                    samples[(m, st.name, layer)] = boot[:, k]
                    point.ci = bootstrap_interval(boot[:, k], options.confidence)
                points.append(point)
            for a, b in comparisons:
                ia, ib = names.index(a), names.index(b)
                assert boot is not None
                differences.append(LayerDifference(
                    model_a=a, model_b=b, layer=layer, dimension_set=st.name, difference=values[ia] - values[ib],
                    ci=bootstrap_interval(boot[:, ia] - boot[:, ib], options.confidence)))
        del rdms
        if progress:
            progress("layer-wise RSA", len(layers), 0)
    if not layers:
        raise InvalidArgument("the models yielded no layers")

    summary = []
    for st in sets:
        ratings = {m: human.models[m][np.ix_(rows, st.cols)] for m in names if m in human.models}
        rating_values: dict[str, float] = {}
        rating_samples: dict[str, np.ndarray] = {}
        if ratings:
            order = list(ratings)
            rdms = [representation_rdm(ratings[m], options.distance, options.zscore,
                                       [f"{m}: {human.feature_names[c]}" for c in st.cols]) for m in order]
            rating_values = {m: rsa_of(st, r) for m, r in zip(order, rdms, strict=True)}
            if keep:
                boot = bootstrap(st, rdms)
                rating_samples = {m: boot[:, k] for k, m in enumerate(order)}
        for m in names:
            mine = [p for p in points if p.model == m and p.dimension_set == st.name and np.isfinite(p.rsa)]
            if not mine:
                continue
            best = max(mine, key=lambda p: p.rsa)
            entry = BehaviourVsLayers(model=m, dimension_set=st.name, best_layer=best.layer,
                                      best_layer_rsa=best.rsa, best_layer_ci=best.ci,
                                      ratings_rsa=rating_values.get(m))
            if m in rating_samples:
                entry.ratings_ci = bootstrap_interval(rating_samples[m], options.confidence)
            summary.append(entry)
    method = (f"layer-wise RSA over {n} words, one RDM per layer and model shared by every dimension set; "
              + describe(options))
    return LayerRsaReport(points=points, differences=differences, summary=summary, layers=layers, n_words=n,
                          n_dropped=len(human.words) - n, method=method)


def _activation_rdm(x: np.ndarray, options: RsaOptions) -> tuple[np.ndarray, np.ndarray]:
    """A layer's RDM; z-scored units that never vary over these words become 0 rather than an error."""
    x = np.asarray(x, dtype=np.float64)
    if options.zscore:
        x = zscore(x, strict=False)
    return calc_rdm(x, options.distance), self_distances(x, options.distance)


def _zip_layers(models: Mapping[str, Layers], n_words: int, limits: Limits) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """The models' layers side by side, checked: the same layer indices in the same order, finite values."""
    iterators = {m: iter(layers) for m, layers in models.items()}
    previous = None
    while True:
        got: dict[str, tuple[int, np.ndarray]] = {}
        for m, it in iterators.items():
            item = next(it, None)
            if item is not None:
                got[m] = item
        if not got:
            return
        if len(got) != len(iterators):
            missing = sorted(set(iterators) - set(got))
            raise InvalidArgument(f"models {', '.join(missing)} have fewer layers than the others")
        indices = {layer for layer, _ in got.values()}
        if len(indices) != 1:
            raise InvalidArgument(f"the models' layers are not aligned: {({m: v[0] for m, v in got.items()})}")
        layer = indices.pop()
        if previous is not None and layer <= previous:
            raise InvalidArgument(f"layers must come in ascending order: {layer} after {previous}")
        previous = layer
        mats: dict[str, np.ndarray] = {}
        for m, (_, x) in got.items():
            x = np.asarray(x)
            if x.ndim != 2 or x.shape[0] != n_words or x.shape[1] < 1:
                raise InvalidArgument(f"model {m!r} layer {layer}: activations have shape {tuple(x.shape)}; "
                                      f"expected ({n_words} words, width)")
            check_limit(x.shape[1], limits.max_features, "activation units", "max_features")
            if not np.isfinite(x).all():
                raise InvalidArgument(f"model {m!r} layer {layer}: activations contain NaN or infinite values")
            mats[m] = x
        yield layer, mats
