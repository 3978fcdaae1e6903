"""The eleven Lancaster sensorimotor dimensions and the many ways source files spell them.

Every dataset is mapped onto one canonical vocabulary so that analyses can compare an English
norm with a Dutch one, or a human rating with a model rating, by dimension name alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sensorium.errors import InvalidArgument

SENSORY: tuple[str, ...] = ("auditory", "gustatory", "haptic", "interoceptive", "olfactory", "visual")
MOTOR: tuple[str, ...] = ("foot_leg", "hand_arm", "head", "mouth", "torso")
DIMENSIONS: tuple[str, ...] = SENSORY + MOTOR
DIMENSION_SETS: dict[str, tuple[str, ...]] = {"sensory": SENSORY, "motor": MOTOR, "all": DIMENSIONS}

# First word of a column name -> dimension. The Dutch verbs are the Speed & Brysbaert (2022)
# column headers; "foot"/"hand" are the paper's shortened motor names.
_STEMS: dict[str, str] = {
    **{d: d for d in SENSORY},
    "foot": "foot_leg", "hand": "hand_arm", "head": "head", "mouth": "mouth", "torso": "torso",
    "horen": "auditory", "proeven": "gustatory", "voelen": "haptic",
    "sensaties": "interoceptive", "ruiken": "olfactory", "zien": "visual",
}
# Tokens that mark a column as some other statistic of the dimension, never its mean.
_NOT_A_MEAN = frozenset(
    {"sd", "std", "stdev", "se", "sem", "var", "n", "count", "known", "min", "max", "median", "range"}
)
# Language prefixes used by NoRaRe-style headers such as ENGLISH_AUDITORY_MEAN.
_PREFIXES = frozenset({"english", "dutch"})
_SPLIT = re.compile(r"[\s._\-]+")


def canonical_dimension(column_name: str) -> str | None:
    """The dimension whose mean rating a column holds, or None.

    The rule is positional rather than a list of spellings: the first word names the dimension
    and no later word may name another statistic (``Auditory.SD``, ``Hand_N``), so new model
    suffixes such as ``_en_ft`` or ``_QA_ft`` need no change here.
    """
    tokens = [t for t in _SPLIT.split(column_name.strip().casefold()) if t]
    while tokens and tokens[0] in _PREFIXES:
        tokens = tokens[1:]
    if not tokens or tokens[0] not in _STEMS:
        return None
    if any(t in _NOT_A_MEAN for t in tokens[1:]):
        return None
    return _STEMS[tokens[0]]


def resolve_dimensions(names: Iterable[str] | str) -> tuple[str, ...]:
    """Expand set names in the caller's order, dropping repeats.

    The caller's order is kept because it decides column order in the analyses that follow.
    """
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for raw in items:
        key = str(raw).strip().casefold()
        if key in DIMENSION_SETS:
            expanded = DIMENSION_SETS[key]
        elif key in DIMENSIONS:
            expanded = (key,)
        else:
            valid = ", ".join((*DIMENSION_SETS, *DIMENSIONS))
            raise InvalidArgument(f"unknown dimension {raw!r}; valid names: {valid}")
        out.extend(d for d in expanded if d not in out)
    if not out:
        raise InvalidArgument("no dimensions given")
    return tuple(out)
