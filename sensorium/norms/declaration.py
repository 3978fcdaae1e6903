"""The one schema that says how a norms file maps onto canonical dimensions.

Every dataset, built-in or user-supplied, is read through a DatasetDeclaration, so a new file
layout is a few lines of YAML rather than new parsing code. Unknown keys are rejected so that a
misspelt field fails loudly with its path instead of being silently ignored.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator, model_validator

from sensorium.errors import InvalidArgument, NotFound
from sensorium.norms.dimensions import DIMENSIONS

# A column, or alternatives tried in order: files derived from the same norms rename columns.
ColumnSpec = str | list[str]
Format = Literal["csv", "tsv", "txt", "xlsx"]
PACKAGE_PREFIX = "package:"
_SUFFIX_FORMATS: dict[str, Format] = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".txt": "txt", ".xlsx": "xlsx"}


class Scale(BaseModel):
    """The source's rating scale; values are mapped linearly onto 0..5."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.max > self.min:
            raise ValueError(f"max ({self.max}) must be greater than min ({self.min})")
        return self


def _canonical_keys(mapping: dict[str, ColumnSpec]) -> dict[str, ColumnSpec]:
    """Dimension keys are case-insensitive in YAML but canonical from here on."""
    out: dict[str, ColumnSpec] = {}
    for key, spec in mapping.items():
        dim = key.strip().casefold()
        if dim not in DIMENSIONS:
            raise ValueError(f"unknown dimension {key!r}; valid: {', '.join(DIMENSIONS)}")
        if isinstance(spec, list) and not spec:
            raise ValueError(f"{key}: empty list of column names")
        out[dim] = spec
    return out


class DatasetDeclaration(BaseModel):
    """Where a norms file is, how to split it, and which column holds what."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    language: str
    file: str | None = None  # relative to the YAML's folder; "package:<package>/<path inside it>" for bundled data
    format: Format | None = None  # inferred from the file suffix when absent
    delimiter: str | None = None
    encoding: str = "utf-8"
    word_column: str
    columns: dict[str, ColumnSpec]
    sd_columns: dict[str, ColumnSpec] = {}
    n_columns: dict[str, ColumnSpec] = {}  # one column may serve several dimensions
    gloss_column: str | None = None
    scale: Scale = Scale(min=0.0, max=5.0)
    citation: str = ""
    licence: str = ""
    notes: str = ""

    _base_dir: Path | None = PrivateAttr(default=None)

    @field_validator("columns", "sd_columns", "n_columns")
    @classmethod
    def _dimension_keys(cls, value: dict[str, ColumnSpec]) -> dict[str, ColumnSpec]:
        return _canonical_keys(value)

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

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.columns:
            raise ValueError("columns: at least one dimension must be declared")
        for field in ("sd_columns", "n_columns"):
            stray = set(getattr(self, field)) - set(self.columns)
            if stray:
                raise ValueError(f"{field}: {', '.join(sorted(stray))} not declared in columns")
        return self

    @classmethod
    def parse(cls, data: Any, source: str, base_dir: Path | None = None) -> DatasetDeclaration:
        """Validate raw data, turning pydantic's errors into one InvalidArgument naming each field."""
        try:
            decl = cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()
            )
            raise InvalidArgument(f"{source}: invalid dataset declaration: {problems}") from None
        decl._base_dir = base_dir
        return decl

    @classmethod
    def from_yaml(cls, path: str | Path) -> DatasetDeclaration:
        """Relative data paths are taken from the YAML's folder so a declaration travels with its data."""
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"dataset declaration {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"{path}: not valid YAML: {exc}") from None
        return cls.parse(data, str(path), base_dir=path.resolve().parent)

    def with_file(self, file: str | Path) -> DatasetDeclaration:
        """The same layout applied to another file: how the built-in layouts meet user data."""
        decl = self.model_copy(update={"file": str(file)})
        decl._base_dir = None
        return decl

    def resolved_file(self) -> str | Path:
        """The file as a filesystem path, or the package reference for bundled data."""
        if self.file is None:
            raise InvalidArgument(f"dataset {self.name!r} declares no file")
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
                f"dataset {self.name!r}: cannot tell the format of {name}; declare format as one of csv, tsv, txt, xlsx"
            )
        return _SUFFIX_FORMATS[suffix]
