"""Ratings tables: one row per word, one column per rating (human or model), read from CSV.

Tables are how ratings reach the analyzer by reference (the paper's released results are such
tables). Columns are matched case-insensitively because the released files spell the same
dimension in several cases (``Visual_en_ft`` beside ``hand_en_ft``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sensorium.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from sensorium.storage import atomic_write_bytes, atomic_write_json, sha256_bytes

MISSING = frozenset({"", "na", "nan", "n/a", "null", "none"})


def _is_missing(text: str) -> bool:
    return text.strip().lower() in MISSING


@dataclass(frozen=True)
class RatingsTable:
    """A parsed table: words plus raw text columns, parsed to numbers only when asked for."""

    source: str
    word_column: str
    words: tuple[str, ...]
    columns: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.words)

    def resolve(self, name: str) -> str:
        """The table's own spelling of a column: exact match first, then case-insensitive."""
        if name in self.columns:
            return name
        hits = [c for c in self.columns if c.casefold() == name.strip().casefold()]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise InvalidArgument(f"{self.source}: column {name!r} is ambiguous: {', '.join(hits)}")
        shown = ", ".join(list(self.columns)[:30])
        raise InvalidArgument(f"{self.source}: no column {name!r}; columns are: {shown}")

    def numeric(self, name: str) -> np.ndarray:
        """One column as float64; missing cells are NaN, any other non-number is an error."""
        col = self.resolve(name)
        out = np.empty(len(self.words))
        for row, text in enumerate(self.columns[col]):
            if _is_missing(text):
                out[row] = np.nan
                continue
            try:
                value = float(text)
            except ValueError:
                raise InvalidArgument(
                    f"{self.source}: row {row + 2}, column {col!r}: {text[:40]!r} is not a number"
                ) from None
            if math.isinf(value):
                raise InvalidArgument(f"{self.source}: row {row + 2}, column {col!r}: infinite value")
            out[row] = value
        return out

    def matrix(self, names: list[str]) -> np.ndarray:
        """Columns side by side, words x len(names)."""
        if not names:
            raise InvalidArgument(f"{self.source}: no columns given")
        return np.column_stack([self.numeric(n) for n in names])


def _normalise_word(word: str) -> str:
    return unicodedata.normalize("NFC", word.strip())


def parse_table(data: bytes | str, source: str, word_column: str | None = None) -> RatingsTable:
    """Parse CSV (comma, tab or semicolon, sniffed) with a header row.

    The word column is ``word_column``, else a column named "word" in any case, else the first.
    Words must be unique after trimming and case-folding; the error names both rows.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if "\x00" in data:
        raise InvalidArgument(f"{source}: contains NUL bytes; not a text table")
    first = data.split("\n", 1)[0]
    delimiter = max(",\t;", key=first.count)
    rows = list(csv.reader(io.StringIO(data, newline=""), delimiter=delimiter))
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise InvalidArgument(f"{source}: empty table (no header row)")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise InvalidArgument(f"{source}: duplicate column name(s) {', '.join(map(repr, dup))}")
    if word_column is None:
        hits = [h for h in header if h.casefold() == "word"]
        word_column = hits[0] if hits else header[0]
    elif word_column not in header:
        hits = [h for h in header if h.casefold() == word_column.casefold()]
        if not hits:
            raise InvalidArgument(f"{source}: no word column {word_column!r}; columns are: {', '.join(header[:30])}")
        word_column = hits[0]
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    columns: dict[str, list[str]] = {h: [] for h in header if h != word_column}
    words: list[str] = []
    seen: dict[str, int] = {}
    wi = header.index(word_column)
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise InvalidArgument(f"{source}: row {line} has {len(row)} fields, the header has {len(header)}")
        word = _normalise_word(row[wi])
        if not word:
            raise InvalidArgument(f"{source}: row {line}, column {word_column!r}: empty word")
        key = word.casefold()
        if key in seen:
            raise InvalidArgument(f"{source}: duplicate word {word!r} in rows {seen[key]} and {line}")
        seen[key] = line
        words.append(word)
        for h, cell in zip(header, row):
            if h != word_column:
                columns[h].append(cell)
    if not words:
        raise InvalidArgument(f"{source}: the table has a header but no rows")
    return RatingsTable(source=source, word_column=word_column, words=tuple(words), columns=columns)


def read_table(path: str | Path, word_column: str | None = None) -> RatingsTable:
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"no such table file: {path}")
    return parse_table(path.read_bytes(), path.name, word_column)


TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_table_name(name: str) -> str:
    # fullmatch, not match: "$" also matches before a final newline, and "t\n" would become a file name
    if not TABLE_NAME.fullmatch(name or "") or ".." in name:
        raise InvalidArgument(
            f"invalid table name {name[:80]!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


STORE = "analyzer tables"  # how errors name the store


class TableStore:
    """Registered tables on disk: ``<name>.<sha256 prefix>.csv`` plus ``<name>.json`` (checksum, word
    column, the data file's name).

    Data files are named by their content and the manifest is written last, both atomically: a
    replace writes the new data beside the old, so until the new manifest is in place the old one
    still names intact data, and a failure at any point (a full disk) leaves the old table
    readable. A table without a manifest was never registered. A load verifies the checksum: a
    damaged table is refused, never analysed. The store only ever reads its own files: a symbolic
    link placed in it is refused, never followed, so no request can make the analyzer read a file
    from elsewhere by a table's name.
    """

    def __init__(self, root: Path, max_bytes: int = 64 << 20) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._cache: dict[str, tuple[tuple[str, int, int], RatingsTable]] = {}

    def _manifest_path(self, name: str) -> Path:
        path = self.root / f"{check_table_name(name)}.json"
        if path.is_symlink():
            raise FailedPrecondition(f"table {name!r} is a link in the table store, not a registered table; "
                                     "links are never followed")
        return path

    def _meta(self, name: str) -> dict:
        meta_path = self._manifest_path(name)
        if not meta_path.exists():
            raise NotFound(f"table {name!r} is not registered")
        return json.loads(meta_path.read_text())

    def _data_path(self, name: str, meta: dict) -> Path:
        """The data file a manifest names (``<name>.csv`` for tables registered before content names)."""
        file = meta.get("file", f"{name}.csv")
        if not isinstance(file, str) or not re.fullmatch(re.escape(name) + r"(\.[0-9a-f]{16})?\.csv", file):
            raise FailedPrecondition(f"table {name!r}: its manifest names {file!r}, not a file of this table")
        path = self.root / file
        if path.is_symlink():
            raise FailedPrecondition(f"table {name!r} is a link in the table store, not a registered table; "
                                     "links are never followed")
        return path

    def register(self, name: str, data: bytes, word_column: str | None = None, replace: bool = False) -> dict:
        meta_path = self._manifest_path(name)
        if len(data) > self.max_bytes:
            raise ResourceExhausted(f"table is {len(data)} bytes; the limit is {self.max_bytes} "
                                    "(setting max_table_bytes)")
        if meta_path.exists() and not replace:
            raise AlreadyExists(f"table {name!r} is already registered (set replace to overwrite it)")
        table = parse_table(data, name, word_column or None)
        info = {"name": name, "n_rows": len(table), "columns": list(table.columns),
                "sha256": sha256_bytes(data), "word_column": table.word_column}
        old = self._meta(name) if meta_path.exists() else None
        file = f"{name}.{info['sha256'][:16]}.csv"
        new_data = not (self.root / file).exists()
        atomic_write_bytes(self.root / file, data, STORE)
        try:
            atomic_write_json(meta_path, {**info, "file": file}, STORE)
        except BaseException:
            if new_data:
                (self.root / file).unlink(missing_ok=True)
            raise
        if old is not None and old.get("file", f"{name}.csv") != file:
            self._data_path(name, old).unlink(missing_ok=True)
        self._cache.pop(name, None)
        return info

    def info(self, name: str) -> dict:
        """What a client sees of a registered table (the manifest without the data file's name)."""
        return {k: v for k, v in self._meta(name).items() if k != "file"}

    def get(self, name: str) -> RatingsTable:
        meta = self._meta(name)
        csv_path = self._data_path(name, meta)
        stat = csv_path.stat() if csv_path.exists() else None
        # the parsed copy is reused only while the file on disk is the one that was verified
        key = (meta["sha256"], stat.st_mtime_ns if stat else 0, stat.st_size if stat else -1)
        cached = self._cache.get(name)
        if cached and cached[0] == key:
            return cached[1]
        data = csv_path.read_bytes() if stat else b""
        if sha256_bytes(data) != meta["sha256"]:
            raise FailedPrecondition(f"table {name!r} is damaged on disk (checksum mismatch); register it again")
        table = parse_table(data, name, meta["word_column"])
        self._cache[name] = (key, table)
        return table

    def list(self) -> list[dict]:
        if not self.root.exists():
            return []
        out = []
        for p in sorted(self.root.glob("*.json")):
            if not TABLE_NAME.fullmatch(p.stem) or ".." in p.stem or p.is_symlink():
                continue
            try:
                self._data_path(p.stem, self._meta(p.stem))
            except FailedPrecondition:
                continue  # a link or a foreign file name: not a table of this store
            out.append(self.info(p.stem))
        return out

    def delete(self, name: str) -> None:
        meta = self._meta(name)
        data_path = self._data_path(name, meta)
        self._manifest_path(name).unlink()
        data_path.unlink(missing_ok=True)
        self._cache.pop(name, None)
