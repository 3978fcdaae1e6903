"""The one schema that says how a norms file maps onto canonical dimensions.

Every dataset, built-in, registered or user-supplied, is read through a DatasetDeclaration, so a
new file layout is a few lines of YAML rather than new parsing code. Unknown keys are rejected so
that a misspelt field fails loudly with its path instead of being silently ignored.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from sensorium.norms.dimensions import DIMENSIONS
from sensorium.norms.layout import PACKAGE_PREFIX, ColumnSpec, FileLayout, Format

__all__ = ["PACKAGE_PREFIX", "ColumnSpec", "DatasetDeclaration", "Format", "Scale"]


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


class DatasetDeclaration(FileLayout):
    """Where a norms file is, how to split it, and which column holds what."""

    kind: ClassVar[str] = "dataset declaration"
    noun: ClassVar[str] = "dataset"

    language: str
    word_column: str
    columns: dict[str, ColumnSpec]
    sd_columns: dict[str, ColumnSpec] = {}
    n_columns: dict[str, ColumnSpec] = {}  # one column may serve several dimensions
    gloss_column: str | None = None  # an English translation of each word, used to align languages
    scale: Scale = Scale(min=0.0, max=5.0)
    # "first": a word listed again (often a second sense) keeps its first row, since a word can
    # only be prompted one way; "error": a repeat is a mistake in the file.
    duplicates: Literal["error", "first"] = "error"
    # "missing": a mean outside the scale (a slip in the published file) is read as missing and
    # logged; "error": it stops the load, since usually the declared scale is what is wrong.
    out_of_range: Literal["error", "missing"] = "error"
    citation: str = ""
    licence: str = ""
    notes: str = ""

    @field_validator("columns", "sd_columns", "n_columns")
    @classmethod
    def _dimension_keys(cls, value: dict[str, ColumnSpec]) -> dict[str, ColumnSpec]:
        return _canonical_keys(value)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.columns:
            raise ValueError("columns: at least one dimension must be declared")
        for field in ("sd_columns", "n_columns"):
            stray = set(getattr(self, field)) - set(self.columns)
            if stray:
                raise ValueError(f"{field}: {', '.join(sorted(stray))} not declared in columns")
        return self
