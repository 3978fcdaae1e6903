"""Tie-averaged ranks that stay exact and lean at tens of millions of pairs.

``scipy.stats.rankdata`` needs the sorted values, the order and its inverse at once (about
32 bytes per value). Here the ranks are produced in chunks of completed tie groups straight
from the sort order, so a Spearman correlation of two RDMs never holds more than one order,
one RDM and one rank vector (24 bytes per pair).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_CHUNK = 1 << 16  # small pieces: reused heap memory instead of fresh multi-MB blocks
#: Above this many values the sort runs as four parts on two threads (numpy releases the GIL
#: while sorting) and the sorted parts are merged piece by piece.
PARALLEL_MIN = 1 << 21


def argsort_packed(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """``np.argsort(x)`` (ties in any order) by sorting one packed integer per value.

    numpy sorts plain 64-bit integers about 2.5x faster than it argsorts floats. Each value
    becomes a fixed-point code of its position in [lo, hi] in the high bits, its index in the low
    bits; the code is monotone in the value, so only values whose codes collide (within about
    1e-12 of the range of each other) can come out of order, and those few runs are re-sorted
    by their exact values.
    """
    n = len(x)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    lo = float(np.min(x)) if lo is None else lo
    hi = float(np.max(x)) if hi is None else hi
    index_bits = max(1, int(n - 1).bit_length())
    code_bits = 63 - index_bits
    if code_bits < 24 or not (np.isfinite(lo) and np.isfinite(hi)):
        return np.argsort(x)
    scale = (2.0**code_bits - 1) / (hi - lo) if hi > lo else 0.0
    key = np.subtract(x, lo)
    key *= scale
    key = key.astype(np.uint64)
    key <<= np.uint64(index_bits)
    key |= np.arange(n, dtype=np.uint64)
    key.sort()
    code = key >> np.uint64(index_bits)
    key &= np.uint64((1 << index_bits) - 1)
    order = key.view(np.int64)
    same = np.flatnonzero(code[1:] == code[:-1])
    if len(same):
        # neighbours with equal codes: exact ties need nothing; near-ties are put in exact order
        bad = same[x[order[same + 1]] < x[order[same]]]
        if len(bad):
            starts = np.searchsorted(code, code[bad], side="left")
            ends = np.searchsorted(code, code[bad], side="right")
            for a, b in set(zip(starts.tolist(), ends.tolist())):
                seg = order[a:b]
                order[a:b] = seg[np.argsort(x[seg], kind="stable")]
    return order


def _sorted_stream(x: np.ndarray, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, values)`` of ``x`` in ascending order, a piece at a time."""
    n = len(x)
    if n < PARALLEL_MIN:
        order = np.argsort(x)
        for a in range(0, n, chunk):
            idx = order[a:a + chunk]
            yield idx, x[idx]
        return
    parts = 8  # small parts: quick sorts, and little transient memory on each thread
    edges = [n * k // parts for k in range(parts + 1)]
    narrow = np.int32 if n < 2**31 else np.int64
    lo, hi = float(np.min(x)), float(np.max(x))

    def sort_part(k: int) -> np.ndarray:
        order = argsort_packed(x[edges[k]:edges[k + 1]], lo, hi)
        order += edges[k]
        return order.astype(narrow)

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(sort_part, range(parts)))
    # The merge runs on its own thread, a couple of pieces ahead of the consumer: both spend
    # their time in numpy calls that release the GIL, so the two cores stay busy.
    pieces: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def merge() -> None:
        try:
            for piece in _merge_runs(x, runs, chunk):
                while not stop.is_set():
                    try:
                        pieces.put(piece, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            pieces.put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            pieces.put(exc)

    worker = threading.Thread(target=merge, name="rank-merge", daemon=True)
    worker.start()
    try:
        while (piece := pieces.get()) is not None:
            if isinstance(piece, BaseException):
                raise piece
            yield piece
    finally:
        stop.set()
        worker.join()


def _merge_runs(x: np.ndarray, runs: list[np.ndarray], chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Merge sorted index runs of ``x`` into one ascending stream of pieces."""
    pos = [0] * len(runs)
    while any(p < len(r) for p, r in zip(pos, runs)):
        idx = [r[p:p + chunk] for r, p in zip(runs, pos)]
        val = [x[i] for i in idx]
        # Everything up to the smallest last value of a run's non-final piece is settled.
        bounds = [v[-1] for r, p, v in zip(runs, pos, val) if len(v) and p + len(v) < len(r)]
        cut = min(bounds) if bounds else np.inf
        take = [int(np.searchsorted(v, cut, side="right")) for v in val]
        merged_idx = np.concatenate([i[:k] for i, k in zip(idx, take)])
        merged_val = np.concatenate([v[:k] for v, k in zip(val, take)])
        m = np.argsort(merged_val, kind="stable")  # a few sorted runs: timsort merges them
        yield merged_idx[m], merged_val[m]
        pos = [p + k for p, k in zip(pos, take)]


def iter_ranks(x: np.ndarray, chunk: int = _CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, doubled_ranks)`` over ``x`` in sorted order, whole tie groups at a time.

    Ranks are 1-based and averaged over ties, as ``scipy.stats.rankdata(method="average")``;
    they are yielded doubled, as exact integers (a tie group's average can end in .5).
    """
    carry = np.empty(0, dtype=np.intp)  # indices of the tie group still open at a piece's edge
    base = 0  # sorted position of carry[0]
    prev = None
    for idx, v in _sorted_stream(x, chunk):
        starts = np.flatnonzero(v[1:] != v[:-1]) + 1 + len(carry)
        if prev is not None and len(carry) and v[0] != prev:
            starts = np.concatenate(([len(carry)], starts))
        everything = np.concatenate((carry, idx)) if len(carry) else idx
        bounds = np.concatenate(([0], starts))
        prev = v[-1]
        closed = int(bounds[-1])
        if closed:
            lengths = np.diff(bounds)
            # sorted positions p..q-1 (0-based) share the rank (p + q + 1) / 2
            twice = 2 * base + bounds[:-1] + bounds[1:] + 1
            yield everything[:closed], np.repeat(twice, lengths)
        carry = everything[closed:]
        base += closed
    if len(carry):
        yield carry, np.full(len(carry), 2 * base + len(carry) + 1)


def doubled_ranks(x: np.ndarray) -> np.ndarray:
    """Twice the tie-averaged ranks, as exact integers: uint32 (4 bytes a value) where they fit."""
    out = np.empty(len(x), dtype=np.uint32 if 2 * len(x) + 1 < 2**32 else np.uint64)
    for idx, r in iter_ranks(x):
        out[idx] = r
    return out


def rank_average(x: np.ndarray) -> np.ndarray:
    """Tie-averaged 1-based ranks of ``x`` (float64), as ``scipy.stats.rankdata``."""
    return doubled_ranks(x) / 2.0


def spearman_from_ranks(twice_a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation given the doubled ranks of ``a`` and the raw values of ``b``.

    The ranks of ``b`` are streamed, never stored. Average ranks always have mean (n + 1) / 2.
    """
    n = len(twice_a)
    mean2 = float(n + 1)  # mean of doubled ranks
    cross = 0.0
    ss_b = 0.0
    for idx, r in iter_ranks(b):
        r = r.astype(np.float64)
        cross += float(np.dot(twice_a[idx].astype(np.float64), r))
        ss_b += float(np.dot(r, r))
    ss_a = 0.0
    for a in range(0, n, _CHUNK):
        part = twice_a[a:a + _CHUNK].astype(np.float64)
        ss_a += float(np.dot(part, part))
    denom = np.sqrt((ss_a - n * mean2 * mean2) * (ss_b - n * mean2 * mean2))
    return float((cross - n * mean2 * mean2) / denom) if denom > 0 else float("nan")


class WeightedRanks:
    """Ranks of one fixed vector when each element is counted ``w`` times (``w`` may be 0).

    A bootstrap resample of words turns every pair of the full RDM into a pair counted
    ``c_i * c_j`` times; the tie groups of the values never change, so the tie-averaged ranks of
    the resampled RDM follow from one sort done here, not one per resample:

    - a vector laid out in its own sorted order (the reference RDM): a running sum of the
      weights is each value's rank, and only the tied values are averaged afterwards;
    - any other vector: a weighted histogram over its tie groups (numpy's scatter-add beats a
      random gather into sorted order at this size).
    """

    def __init__(self, values: np.ndarray) -> None:
        order = argsort_packed(values)
        v = values[order]
        new = np.empty(len(v), dtype=bool)
        new[:1] = True
        np.not_equal(v[1:], v[:-1], out=new[1:])
        group_sorted = np.cumsum(new) - 1
        self.n_groups = int(group_sorted[-1]) + 1 if len(v) else 0
        # in order: ascending as laid out (the order of ties within a group does not matter)
        self.in_order = bool(np.all(values[1:] >= values[:-1])) if len(v) else True
        if self.in_order:
            sizes = np.bincount(group_sorted, minlength=self.n_groups)
            # tied elements, their tie group (renumbered 0..T-1) and each group's first element
            self.tie_pos = np.flatnonzero(sizes[group_sorted] > 1)
            tie_groups, self.tie_group = np.unique(group_sorted[self.tie_pos], return_inverse=True)
            self.tie_first = np.searchsorted(group_sorted, tie_groups, side="left")
        else:
            self.group = np.empty(len(v), dtype=np.intp)
            self.group[order] = group_sorted

    def ranks(self, w: np.ndarray) -> tuple[np.ndarray, float]:
        """Per-element tie-averaged ranks and their weighted sum of squares."""
        if not self.in_order:
            gw = np.bincount(self.group, weights=w, minlength=self.n_groups)
            avg = np.cumsum(gw)
            avg -= 0.5 * gw
            avg += 0.5
            return avg[self.group], float(np.dot(gw * avg, avg))
        cs = np.cumsum(w)
        r = cs - 0.5 * w
        r += 0.5
        if len(self.tie_pos):
            group_weight = np.bincount(self.tie_group, weights=w[self.tie_pos], minlength=len(self.tie_first))
            below = cs[self.tie_first] - w[self.tie_first]
            r[self.tie_pos] = (below + (group_weight + 1.0) / 2.0)[self.tie_group]
        return r, float(np.dot(w * r, r))
