"""Tie-averaged ranks that stay exact and lean at tens of millions of pairs.

``scipy.stats.rankdata`` needs the sorted values, the order and its inverse at once (about
32 bytes per value). Here the ranks are produced in chunks of completed tie groups straight
from the sort order, so a Spearman correlation of two RDMs never holds more than one order,
one RDM and one rank vector (24 bytes per pair).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_CHUNK = 1 << 22


def iter_ranks(x: np.ndarray, chunk: int = _CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, ranks)`` over ``x`` in sorted order, one run of whole tie groups at a time.

    Ranks are 1-based and averaged over ties, as ``scipy.stats.rankdata(method="average")``.
    """
    n = len(x)
    order = np.argsort(x, kind="stable")
    pending = 0  # first sorted position of the tie group still open at the chunk edge
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        v = x[order[a:b]]
        starts = np.flatnonzero(v[1:] != v[:-1]) + a + 1
        if a > 0 and v[0] != x[order[a - 1]]:
            starts = np.concatenate((np.array([a]), starts))
        tail = np.array([n] if b == n else [], dtype=np.int64)
        bounds = np.concatenate((np.array([pending]), starts, tail)).astype(np.int64)
        if len(bounds) < 2:
            continue
        lengths = np.diff(bounds)
        # positions p..q-1 (0-based) share the rank (p + q + 1) / 2
        avg = (bounds[:-1] + bounds[1:] + 1) / 2.0
        yield order[bounds[0]:bounds[-1]], np.repeat(avg, lengths)
        pending = int(bounds[-1])


def rank_average(x: np.ndarray) -> np.ndarray:
    """Tie-averaged 1-based ranks of ``x`` (float64)."""
    out = np.empty(len(x), dtype=np.float64)
    for idx, r in iter_ranks(x):
        out[idx] = r
    return out


def spearman_from_ranks(ranks_a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation given the ranks of ``a`` and the raw values of ``b``.

    The ranks of ``b`` are streamed, never stored. Average ranks always have mean (n + 1) / 2.
    """
    n = len(ranks_a)
    mean = (n + 1) / 2.0
    cross = 0.0
    ss_b = 0.0
    for idx, r in iter_ranks(b):
        cross += float(np.dot(ranks_a[idx], r))
        ss_b += float(np.dot(r, r))
    ss_a = float(np.dot(ranks_a, ranks_a))
    denom = np.sqrt((ss_a - n * mean * mean) * (ss_b - n * mean * mean))
    return float((cross - n * mean * mean) / denom) if denom > 0 else float("nan")


class WeightedRanks:
    """Ranks of one fixed vector when each element is counted ``w`` times (``w`` may be 0).

    A bootstrap resample of words turns every pair of the full RDM into a pair counted
    ``c_i * c_j`` times; the tie groups of the values never change, so the tie-averaged ranks of
    the resampled RDM follow from one sort done here and a weighted histogram per resample.
    Values that are already sorted (the reference RDM, laid out in its own order) are summed per
    tie group sequentially instead of scattered. Buffers are reused: fresh multi-megabyte arrays
    per resample cost page faults that show in the timings.
    """

    def __init__(self, values: np.ndarray) -> None:
        order = np.argsort(values, kind="stable")
        v = values[order]
        new = np.empty(len(v), dtype=bool)
        new[:1] = True
        np.not_equal(v[1:], v[:-1], out=new[1:])
        self.n_groups = int(new.sum())
        self.sorted = bool(np.all(order == np.arange(len(v))))
        if self.sorted:
            self.starts = np.flatnonzero(new)
            self.lengths = np.diff(np.append(self.starts, len(v)))
            self.no_ties = self.n_groups == len(v)
        else:
            self.group = np.empty(len(v), dtype=np.intp)
            self.group[order] = np.cumsum(new) - 1
        self._avg = np.empty(self.n_groups)
        self._half = np.empty(self.n_groups)

    def ranks(self, w: np.ndarray) -> tuple[np.ndarray, float]:
        """Per-element tie-averaged ranks of the weighted multiset and their weighted sum of squares."""
        if self.sorted:
            gw = w if self.no_ties else np.add.reduceat(w, self.starts)
        else:
            gw = np.bincount(self.group, weights=w, minlength=self.n_groups)
        half = np.multiply(gw, 0.5, out=self._half)
        avg = np.cumsum(gw, out=self._avg)
        avg -= half
        avg += 0.5
        np.multiply(gw, avg, out=half)
        ss = float(np.dot(half, avg))
        if self.sorted:
            if self.no_ties:
                return avg, ss
            return np.repeat(avg, self.lengths), ss
        return avg[self.group], ss
