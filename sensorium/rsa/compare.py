"""Comparisons of two RDMs: Spearman (default), Pearson and Kendall's tau-a."""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
from scipy import stats

from sensorium.errors import InvalidArgument
from sensorium.rsa.ranks import doubled_ranks, spearman_from_ranks

Comparison = Literal["spearman", "pearson", "kendall-tau-a"]
COMPARISONS: tuple[str, ...] = get_args(Comparison)


def check_comparison(method: str) -> str:
    if method not in COMPARISONS:
        raise InvalidArgument(f"unknown comparison {method!r}; expected one of {', '.join(COMPARISONS)}")
    return method


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return float(np.dot(a, b) / denom) if denom > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return spearman_from_ranks(doubled_ranks(a), b)


def kendall_tau_a(a: np.ndarray, b: np.ndarray) -> float:
    """(concordant - discordant) / (n (n - 1) / 2): ties count for neither, unlike tau-b.

    Derived from scipy's O(n log n) tau-b through the tie counts, since
    tau_b = (C - D) / sqrt((n0 - n1)(n0 - n2)).
    """
    n = len(a)
    n0 = n * (n - 1) / 2.0
    tau_b = stats.kendalltau(a, b, variant="b").statistic
    if not np.isfinite(tau_b):
        return float("nan")

    def tied_pairs(x: np.ndarray) -> float:
        _, counts = np.unique(x, return_counts=True)
        return float(np.sum(counts * (counts - 1.0) / 2.0))

    return float(tau_b * np.sqrt((n0 - tied_pairs(a)) * (n0 - tied_pairs(b))) / n0)


def compare_rdms(a: np.ndarray, b: np.ndarray, method: Comparison = "spearman") -> float:
    """Similarity of two condensed RDMs of the same words."""
    check_comparison(method)
    if method == "spearman":
        return spearman(a, b)
    if method == "pearson":
        return pearson(a, b)
    return kendall_tau_a(a, b)
