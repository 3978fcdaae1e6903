"""Representational dissimilarity matrices, kept condensed (upper triangle, row-major).

Distances between few features (ratings: 6-11 dimensions) are computed feature by feature as
differences, in one fixed order for every pair: identical rows then give exactly 0 and identical
pairs of rows give bit-identical distances, so rank ties in the RDM are the ties of the data, as
they are for ``scipy.spatial.distance.pdist``. Many features (activations) go through blocked BLAS
Gram products instead, where exact ties between distinct pairs do not occur in practice.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from sensorium.errors import InvalidArgument

Distance = Literal["cosine", "correlation", "euclidean"]
DISTANCES: tuple[str, ...] = get_args(Distance)

#: The paper's rule: a distance that is undefined (a zero vector under cosine, a constant row
#: under correlation) counts as the largest cosine distance.
UNDEFINED_DISTANCE = 2.0
#: Up to this many features the exact difference kernel is used.
EXACT_MAX_FEATURES = 32
_PAIRS_PER_CHUNK = 1 << 21


def n_pairs(n: int) -> int:
    return n * (n - 1) // 2


def zscore(x: np.ndarray, feature_names: list[str] | None = None, *, strict: bool = True) -> np.ndarray:
    """Z-score each column with the population SD, as the paper did.

    A constant column has no z-scores: ``strict`` refuses it with the column named; otherwise
    (inside a bootstrap resample, where a column can become constant by chance) it becomes 0.
    """
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    constant = ~(sd > 0)
    if constant.any():
        if strict:
            names = feature_names or [f"f{i}" for i in range(x.shape[1])]
            bad = ", ".join(repr(names[i]) for i in np.flatnonzero(constant)[:5])
            raise InvalidArgument(
                f"constant column(s) {bad} across the {x.shape[0]} words: z-scores are undefined "
                "(drop the column or turn z-scoring off)"
            )
        sd = np.where(constant, 1.0, sd)
    z = (x - mean) / sd
    if constant.any():
        z[:, constant] = 0.0
    return z


def _prepare_rows(x: np.ndarray, distance: str) -> np.ndarray:
    """Rows in the space where the distance is Euclidean-like: unit rows for cosine/correlation."""
    if distance not in DISTANCES:
        raise InvalidArgument(f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)}")
    x = np.asarray(x, dtype=np.float64)
    if distance == "euclidean":
        return x
    # one working copy, modified in place: at 10,000 x 576 each copy is 46 MB
    u = x - x.mean(axis=1, keepdims=True) if distance == "correlation" else x.copy()
    norms = np.sqrt(np.einsum("ij,ij->i", u, u))
    with np.errstate(invalid="ignore", divide="ignore"):
        u /= np.where(norms > 0, norms, np.nan)[:, None]
    return u


def pair_rows(n: int, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the condensed pairs whose row lies in ``[first, stop)``."""
    rows = np.arange(first, stop)
    lengths = n - 1 - rows
    i = np.repeat(rows, lengths)
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    j = np.arange(int(lengths.sum())) - offsets + i + 1
    return i.astype(np.int32), j.astype(np.int32)


def row_blocks(n: int, pairs_per_block: int = _PAIRS_PER_CHUNK):
    """Split rows into blocks of about ``pairs_per_block`` condensed pairs each: (first, stop, start)."""
    first, start = 0, 0
    while first < n - 1:
        stop, count = first, 0
        while stop < n - 1 and (count == 0 or count + (n - 1 - stop) <= pairs_per_block):
            count += n - 1 - stop
            stop += 1
        yield first, stop, start
        first, start = stop, start + count


def calc_rdm(x: np.ndarray, distance: Distance = "cosine") -> np.ndarray:
    """Condensed RDM (float64) of the rows of ``x``; undefined distances become 2.0."""
    u = _prepare_rows(x, distance)
    n, f = u.shape
    out = np.empty(n_pairs(n), dtype=np.float64)
    if f <= EXACT_MAX_FEATURES:
        cols = np.ascontiguousarray(u.T)
        for first, stop, start in row_blocks(n):
            i, j = pair_rows(n, first, stop)
            acc = np.zeros(len(i))
            for col in cols:
                diff = col[i] - col[j]
                acc += diff * diff
            out[start:start + len(i)] = np.sqrt(acc) if distance == "euclidean" else acc / 2.0
    else:
        sq = np.einsum("ij,ij->i", u, u)
        for first, stop, start in row_blocks(n):
            gram = u[first:stop] @ u[first:].T
            pos = start
            for r in range(first, stop):
                g = gram[r - first, r - first + 1:]
                if distance == "euclidean":
                    seg = np.sqrt(np.maximum(sq[r] + sq[r + 1:] - 2.0 * g, 0.0))
                else:
                    seg = np.maximum(1.0 - g, 0.0)
                out[pos:pos + len(seg)] = seg
                pos += len(seg)
    out[np.isnan(out)] = UNDEFINED_DISTANCE
    return out


def self_distances(x: np.ndarray, distance: Distance = "cosine") -> np.ndarray:
    """Distance of each row to itself: 0, or 2.0 where the distance is undefined.

    A word drawn twice in a bootstrap resample forms a pair with itself; this is its distance.
    """
    u = _prepare_rows(x, distance)
    return np.where(np.isnan(u).any(axis=1), UNDEFINED_DISTANCE, 0.0)


def square(condensed: np.ndarray, diagonal: np.ndarray | float = 0.0) -> np.ndarray:
    """Full symmetric matrix from a condensed RDM (for plots and small references)."""
    m = len(condensed)
    n = int(round((1 + np.sqrt(1 + 8 * m)) / 2))
    out = np.zeros((n, n))
    iu = np.triu_indices(n, 1)
    out[iu] = condensed
    out.T[iu] = condensed
    out[np.diag_indices(n)] = diagonal
    return out
