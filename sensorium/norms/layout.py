"""Where a table file is and which of its rows are data: the part every declared file shares.

Norms files and translation tables come as CSV, TSV, whitespace-aligned text or spreadsheets,
sometimes with title rows above the header, notes below the table, or rows of another kind mixed
in. Those facts are declared here once, so that each reader of a table honours them the same way
and reports problems in the same words.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from sensorium.errors import InvalidArgument, NotFound

# A column, or alternatives tried in order: files derived from the same norms rename columns.
ColumnSpec = str | list[str]
Format = Literal["csv", "tsv", "txt", "xlsx"]
PACKAGE_PREFIX = "package:"
_SUFFIX_FORMATS: dict[str, Format] = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".txt": "txt", ".xlsx": "xlsx"}


class FileLayout(BaseModel):
    """A table file: its location, format, and the rows that hold data."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str] = "table declaration"  # names the schema in error messages
    noun: ClassVar[str] = "table"  # names one declared table in error messages

    name: str
    file: str | None = None  # relative to the YAML's folder (or a data root); "package:<package>/<path>" for bundled data
    format: Format | None = None  # inferred from the file suffix when absent
    delimiter: str | None = None
    encoding: str = "utf-8"
    sheet: str | None = None  # xlsx only: the sheet holding the table; default the first
    header_row: int = Field(1, ge=1)  # line (sheet row) of the column names; rows above are titles or group labels
    last_row: int | None = Field(None, ge=1)  # the table's last line (sheet row); what lies below is notes, not data
    rows: int | None = Field(None, ge=0)  # data rows the source documents: another count means another file version
    keep_rows: dict[str, list[str]] = {}  # column -> accepted values, for files that mix rows of several kinds

    _base_dir: Path | None = PrivateAttr(default=None)

    @field_validator("delimiter")
    @classmethod
    def _one_char(cls, value: str | None) -> str | None:
        if value is not None and len(value) != 1:
            raise ValueError(f"delimiter must be one character, got {value!r}")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None
        return value

    @field_validator("keep_rows")
    @classmethod
    def _values_given(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        empty = [column for column, accepted in value.items() if not accepted]
        if empty:
            raise ValueError(f"no accepted values for column(s) {', '.join(empty)}: such a filter keeps no row")
        return value

    @model_validator(mode="after")
    def _table_bounds(self) -> Self:
        if self.last_row is not None and self.last_row <= self.header_row:
            raise ValueError(f"last_row ({self.last_row}) must come after header_row ({self.header_row})")
        return self

    @classmethod
    def parse(cls, data: Any, source: str, base_dir: Path | None = None) -> Self:
        """Validate raw data, turning pydantic's errors into one InvalidArgument naming each field."""
        try:
            decl = cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()
            )
            raise InvalidArgument(f"{source}: invalid {cls.kind}: {problems}") from None
        decl._base_dir = base_dir
        return decl

    @classmethod
    def from_text(cls, text: str, source: str, base_dir: Path | None = None) -> Self:
        """YAML text, as a file holds it or as the package ships it."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"{source}: not valid YAML: {exc}") from None
        return cls.parse(data, source, base_dir)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Relative data paths are taken from the YAML's folder so a declaration travels with its data."""
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"{cls.kind} {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{path}: not valid YAML: {exc}") from None
        return cls.from_text(text, str(path), base_dir=path.resolve().parent)

    def with_file(self, file: str | Path) -> Self:
        """The same layout applied to another file: how the built-in layouts meet user data."""
        decl = self.model_copy(update={"file": str(file)})
        decl._base_dir = None
        return decl

    def under(self, root: str | Path) -> Self:
        """The same declaration with its relative file taken from ``root``, a data folder chosen by the user."""
        decl = self.model_copy()
        decl._base_dir = Path(root).expanduser()
        return decl

    def resolved_file(self) -> str | Path:
        """The file as a filesystem path, or the package reference for bundled data."""
        if self.file is None:
            raise InvalidArgument(f"{self.label} declares no file")
        if self.file.startswith(PACKAGE_PREFIX):
            return self.file
        path = Path(self.file).expanduser()
        if not path.is_absolute() and self._base_dir is not None:
            path = self._base_dir / path
        return path

    def resolved_format(self, name: str) -> Format:
        """The declared format, else the suffix's: the built-in layouts are applied to csv and tsv alike."""
        if self.format is not None:
            return self.format
        suffix = Path(name).suffix.lower()
        if suffix not in _SUFFIX_FORMATS:
            raise InvalidArgument(
                f"{self.label}: cannot tell the format of {name}; declare format as one of csv, tsv, txt, xlsx"
            )
        return _SUFFIX_FORMATS[suffix]

    @property
    def label(self) -> str:
        """How errors name this table."""
        return f"{self.noun} {self.name!r}"
