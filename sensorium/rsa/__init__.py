"""Representational similarity analysis: RDMs, their comparison, and inference over words."""

from sensorium.rsa.analysis import (
    DimensionSet,
    Interval,
    NoiseCeiling,
    RsaDifference,
    RsaOptions,
    RsaReport,
    RsaResult,
    run_rsa,
)
from sensorium.rsa.compare import COMPARISONS, Comparison, compare_rdms, kendall_tau_a
from sensorium.rsa.rdm import DISTANCES, Distance, calc_rdm, self_distances, zscore

__all__ = [
    "COMPARISONS", "DISTANCES", "Comparison", "DimensionSet", "Distance", "Interval", "NoiseCeiling",
    "RsaDifference", "RsaOptions", "RsaReport", "RsaResult", "calc_rdm", "compare_rdms",
    "kendall_tau_a", "run_rsa", "self_distances", "zscore",
]
