"""The cells of one worksheet of an .xlsx file, read with the standard library alone.

Several published norms exist only as spreadsheets. An .xlsx file is a zip of XML parts, and a
norms table needs nothing but each cell's stored value, so reading it here keeps spreadsheets
loadable without an extra dependency. Values come back as the text Excel stored: numbers in
full precision, formulas as their cached results.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from sensorium.errors import InvalidArgument

_MAIN = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_DOC_REL = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}id"
_PKG_REL = "{http://schemas.openxmlformats.org/package/2006/relationships}Relationship"
_COLUMN = re.compile(r"[A-Z]+")


def _column(reference: str | None, previous: int) -> int:
    """Zero-based column of a cell reference such as ``AB12``; the next column when it is absent."""
    match = _COLUMN.match(reference or "")
    if match is None:
        return previous + 1
    number = 0
    for letter in match.group():
        number = number * 26 + ord(letter) - 64
    return number - 1


def _text(element: ET.Element) -> str:
    """A string item's text: plain or rich-text runs, leaving out phonetic guides (``rPh``)."""
    parts = [element.findtext(f"{_MAIN}t") or ""]
    parts += [run.findtext(f"{_MAIN}t") or "" for run in element.findall(f"{_MAIN}r")]
    return "".join(parts)


def _shared_strings(book: zipfile.ZipFile) -> list[str]:
    if "xl/sharedStrings.xml" not in book.namelist():
        return []
    root = ET.fromstring(book.read("xl/sharedStrings.xml"))
    return [_text(item) for item in root.iter(f"{_MAIN}si")]


def _sheet_part(book: zipfile.ZipFile, path: Path, sheet: str | None) -> str:
    """The zip member holding a sheet, found by name through the workbook's relationships."""
    workbook = ET.fromstring(book.read("xl/workbook.xml"))
    relations = ET.fromstring(book.read("xl/_rels/workbook.xml.rels"))
    targets = {rel.get("Id"): rel.get("Target", "") for rel in relations.iter(_PKG_REL)}
    sheets = {s.get("name", ""): targets.get(s.get(_DOC_REL), "") for s in workbook.iter(f"{_MAIN}sheet")}
    if not sheets:
        raise InvalidArgument(f"{path}: the workbook has no sheets")
    name = next(iter(sheets)) if sheet is None else sheet
    if name not in sheets:
        raise InvalidArgument(f"{path}: no sheet {sheet!r}; sheets: {', '.join(sheets)}")
    target = sheets[name]
    member = target.lstrip("/") if target.startswith("/") else str(PurePosixPath("xl") / target)
    if member not in book.namelist():
        raise InvalidArgument(f"{path}: sheet {name!r} points at {target}, which the file lacks")
    return member


def _value(cell: ET.Element, shared: list[str]) -> str:
    kind = cell.get("t")
    if kind == "inlineStr":
        item = cell.find(f"{_MAIN}is")
        return "" if item is None else _text(item)
    value = cell.findtext(f"{_MAIN}v") or ""
    if kind == "s" and value:
        return shared[int(value)]
    return value


def _rows(book: zipfile.ZipFile, member: str, shared: list[str]) -> Iterator[tuple[int, list[str]]]:
    number = 0
    with book.open(member) as stream:
        for _, element in ET.iterparse(stream):
            if element.tag != f"{_MAIN}row":
                continue
            number = int(element.get("r") or number + 1)
            cells: dict[int, str] = {}
            at = -1
            for cell in element.iter(f"{_MAIN}c"):
                at = _column(cell.get("r"), at)
                cells[at] = _value(cell, shared)
            element.clear()  # rows are consumed one by one; a large sheet is never held whole
            if any(cells.values()):
                yield number, [cells.get(i, "") for i in range(max(cells) + 1)]


def sheet_rows(path: Path, sheet: str | None = None) -> Iterator[tuple[int, list[str]]]:
    """(sheet row number, cell texts) for each non-empty row of ``sheet`` (default: the first sheet)."""
    try:
        with zipfile.ZipFile(path) as book:
            shared = _shared_strings(book)
            yield from _rows(book, _sheet_part(book, path, sheet), shared)
    except (zipfile.BadZipFile, KeyError, ET.ParseError, ValueError, IndexError) as exc:
        raise InvalidArgument(f"{path}: not a readable .xlsx workbook ({exc})") from None
