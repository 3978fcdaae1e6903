"""Turn a declared file into Norms: the single parsing path for every dataset.

Errors name the file, the line (the header is line 1) and the column, because norms files are
edited by hand and a bad cell must be findable without re-reading the code.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from sensorium.errors import InvalidArgument
from sensorium.norms.declaration import DatasetDeclaration
from sensorium.norms.dimensions import DIMENSIONS
from sensorium.norms.model import Norms, normalise_word
from sensorium.norms.table import Row, Table, read_table

logger = logging.getLogger(__name__)

# Empty cells, the usual missing-value markers, and spreadsheet error values (a cell whose formula
# could not be computed, such as the SD of a single rating) all mean "no value".
MISSING = frozenset({"", "na", "nan", "n/a", "null", "none", "#div/0!", "#n/a", "#num!", "#value!"})
_TOLERANCE = 1e-9  # rounding in exported files must not turn a 5.0 into an error


def _numbers(cells: list[str], lines: list[int], path: Path, column: str) -> np.ndarray:
    out = np.empty(len(cells))
    for i, text in enumerate(cells):
        try:
            out[i] = float(text)
        except ValueError:
            if text.strip().lower() not in MISSING:
                raise InvalidArgument(f"{path}: line {lines[i]}, column {column!r}: {text!r} is not a number") from None
            out[i] = math.nan
    return out


def _out_of_range(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.flatnonzero((values < low - _TOLERANCE) | (values > high + _TOLERANCE) | np.isinf(values))


def _check_range(values: np.ndarray, low: float, high: float, lines: list[int], path: Path, column: str) -> None:
    bad = _out_of_range(values, low, high)
    if bad.size:
        i = int(bad[0])
        raise InvalidArgument(
            f"{path}: line {lines[i]}, column {column!r}: {values[i]:g} is outside the declared range {low:g}..{high:g}"
            + (f" ({bad.size} such cells)" if bad.size > 1 else "")
        )


def _drop_out_of_range(values: np.ndarray, low: float, high: float, lines: list[int], path: Path, column: str) -> None:
    """Impossible values (a mean above the scale's top) become missing, each one logged."""
    for i in _out_of_range(values, low, high).tolist():
        logger.info("%s: line %d, column %r: %g is outside %g..%g; read as missing",
                    path, lines[i], column, values[i], low, high)
        values[i] = math.nan


def _block(
    columns: dict[str, tuple[str, int]], dims: tuple[str, ...], rows: list[Row], path: Path, low: float, high: float,
    lenient: bool = False,
) -> np.ndarray | None:
    """One words x dimensions array from the declared columns, range-checked in source units."""
    if not columns:
        return None
    lines = [line for line, _ in rows]
    block = np.full((len(rows), len(dims)), math.nan)
    for dim, (name, at) in columns.items():
        values = _numbers([cells[at] for _, cells in rows], lines, path, name)
        (_drop_out_of_range if lenient else _check_range)(values, low, high, lines, path, name)
        block[:, dims.index(dim)] = values
    return block


def _word_rows(decl: DatasetDeclaration, table: Table) -> tuple[list[str], list[Row]]:
    """Each word with its row, in file order; a repeated word is an error or keeps its first row."""
    word_name, word_at = table.column(decl.word_column)
    words: list[str] = []
    rows: list[Row] = []
    first_line: dict[str, int] = {}
    for line, cells in table.rows:
        word = normalise_word(cells[word_at])
        if not word:
            raise InvalidArgument(f"{table.path}: line {line}, column {word_name!r}: empty word")
        if word in first_line:
            if decl.duplicates == "first":
                logger.info("%s: line %d repeats %r (first on line %d); the first is kept",
                            table.path, line, word, first_line[word])
                continue
            raise InvalidArgument(
                f"{table.path}: line {line}, column {word_name!r}: duplicate word {word!r} "
                f"(after case normalisation; first on line {first_line[word]})"
            )
        first_line[word] = line
        words.append(word)
        rows.append((line, cells))
    return words, rows


def _parse(decl: DatasetDeclaration, table: Table) -> Norms:
    words, rows = _word_rows(decl, table)
    gloss_at = table.column(decl.gloss_column)[1] if decl.gloss_column else None
    means_at, sds_at, n_at = (
        {dim: table.column(spec) for dim, spec in mapping.items()}
        for mapping in (decl.columns, decl.sd_columns, decl.n_columns)
    )
    dims = tuple(d for d in DIMENSIONS if d in decl.columns)  # canonical order, whatever the YAML's
    low, high = decl.scale.min, decl.scale.max
    factor = 5.0 / (high - low)
    means = _block(means_at, dims, rows, table.path, low, high, lenient=decl.out_of_range == "missing")
    sds = _block(sds_at, dims, rows, table.path, 0.0, math.inf)
    return Norms(
        language=decl.language,
        dataset=decl.name,
        words=tuple(words),
        dimensions=dims,
        means=(means - low) * factor,  # type: ignore[operator]
        sds=None if sds is None else sds * factor,
        n_raters=_block(n_at, dims, rows, table.path, 0.0, math.inf),
        gloss=None if gloss_at is None else tuple(normalise_word(cells[gloss_at]) or None for _, cells in rows),
        citation=decl.citation,
        licence=decl.licence,
    )


def load_declared(source: DatasetDeclaration | str | Path, *, file: str | Path | None = None) -> Norms:
    """Load norms from a declaration (or the YAML holding one), optionally on another file."""
    decl = source if isinstance(source, DatasetDeclaration) else DatasetDeclaration.from_yaml(source)
    if file is not None:
        decl = decl.with_file(file)
    return _parse(decl, read_table(decl))
