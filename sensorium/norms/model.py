"""One dataset of norms in memory: words by canonical dimensions, always on the 0..5 scale.

The arrays are made read-only so that a Norms can be shared between analyses (and cached)
without one caller's edit leaking into another's results.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from sensorium.errors import InvalidArgument, NotFound
from sensorium.norms.dimensions import resolve_dimensions

SCALE: tuple[float, float] = (0.0, 5.0)


def normalise_word(text: str) -> str:
    """Lower-case, stripped, NFC: the form under which words from different files meet."""
    return unicodedata.normalize("NFC", text.strip().lower())


def _frozen(values: np.ndarray | None, shape: tuple[int, int], what: str) -> np.ndarray | None:
    if values is None:
        return None
    out = np.array(values, dtype=np.float64)
    if out.shape != shape:
        raise InvalidArgument(f"{what} has shape {out.shape}, expected {shape}")
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)  # element-wise array comparison has no single truth value
class Norms:
    """Means (and where known SDs and rater counts) per word and dimension; NaN where missing."""

    language: str
    dataset: str
    words: tuple[str, ...]
    dimensions: tuple[str, ...]
    means: np.ndarray
    sds: np.ndarray | None = None
    n_raters: np.ndarray | None = None
    gloss: tuple[str | None, ...] | None = None
    citation: str = ""
    licence: str = ""
    scale: tuple[float, float] = field(default=SCALE, init=False)

    def __post_init__(self) -> None:
        shape = (len(self.words), len(self.dimensions))
        for name in ("means", "sds", "n_raters"):
            object.__setattr__(self, name, _frozen(getattr(self, name), shape, name))
        if self.gloss is not None and len(self.gloss) != len(self.words):
            raise InvalidArgument(f"gloss has {len(self.gloss)} entries for {len(self.words)} words")

    def __len__(self) -> int:
        return len(self.words)

    @cached_property
    def index(self) -> dict[str, int]:
        """Row of each word, built once because selection by word is the common access."""
        return {w: i for i, w in enumerate(self.words)}

    def column(self, dimension: str) -> np.ndarray:
        """Means of one dimension, in word order."""
        wanted = resolve_dimensions(dimension)
        if len(wanted) != 1:
            raise InvalidArgument(f"column() takes one dimension, not the set {dimension!r}")
        return self.means[:, self._dimension_positions(wanted)[0]]

    def subset(self, dimensions: Iterable[str] | str) -> Norms:
        """The same words restricted to (and ordered by) the requested dimensions."""
        wanted = resolve_dimensions(dimensions)
        cols = self._dimension_positions(wanted)
        return replace(
            self,
            dimensions=wanted,
            means=self.means[:, cols],
            sds=None if self.sds is None else self.sds[:, cols],
            n_raters=None if self.n_raters is None else self.n_raters[:, cols],
        )

    def select(self, words: Iterable[str]) -> Norms:
        """The requested words in the requested order; all must be present so gaps are never silent."""
        keys = [normalise_word(w) for w in words]
        missing = [w for w in keys if w not in self.index]
        if missing:
            shown = ", ".join(repr(w) for w in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise NotFound(f"{self.dataset}: {len(missing)} word(s) not in the norms: {shown}{more}")
        rows = [self.index[w] for w in keys]
        return replace(
            self,
            words=tuple(keys),
            means=self.means[rows],
            sds=None if self.sds is None else self.sds[rows],
            n_raters=None if self.n_raters is None else self.n_raters[rows],
            gloss=None if self.gloss is None else tuple(self.gloss[r] for r in rows),
        )

    def to_records(self) -> list[dict[str, str | float | None]]:
        """One plain dict per word (means only, None where missing), ready for JSON."""
        return [
            {"word": w, **{d: None if math.isnan(v) else v for d, v in zip(self.dimensions, row, strict=True)}}
            for w, row in zip(self.words, self.means.tolist(), strict=True)
        ]

    def _dimension_positions(self, wanted: tuple[str, ...]) -> list[int]:
        absent = [d for d in wanted if d not in self.dimensions]
        if absent:
            raise NotFound(
                f"{self.dataset}: dimension(s) {', '.join(absent)} not in these norms "
                f"(present: {', '.join(self.dimensions)})"
            )
        return [self.dimensions.index(d) for d in wanted]
