"""One rating prompt for one dimension in one language, and the rules every prompt obeys.

A template is a ``str.format`` string with a single ``{word}`` field. The word comes last (only
a short fixed suffix may follow it) so that every word rated with a template shares the longest
possible prefix, which the extractor encodes once and reuses from the key/value cache.
"""

from __future__ import annotations

import hashlib
import json
from string import Formatter
from typing import Self

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator, model_validator

from sensorium.norms.dimensions import DIMENSIONS

PLACEHOLDER = "word"


def split_text(text: str) -> tuple[str, str]:
    """The literal text before and after the single ``{word}`` field, braces unescaped.

    Raises ValueError (the pydantic convention) because callers turn it into an error that names
    where the text came from, which this function cannot know.
    """
    try:
        parts = list(Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"malformed braces ({exc}); write literal braces as {{{{ and }}}}") from None
    before: list[str] = []
    after: list[str] = []
    seen = 0
    for literal, field, spec, conversion in parts:
        (after if seen else before).append(literal)
        if field is None:
            continue
        if field != PLACEHOLDER:
            raise ValueError(
                f"unexpected field {{{field}}}; the only field allowed is {{{PLACEHOLDER}}}, "
                "write literal braces as {{ and }}"
            )
        if spec or conversion:
            raise ValueError(f"{{{PLACEHOLDER}}} must not carry a conversion or format spec")
        seen += 1
    if seen != 1:
        raise ValueError(f"the placeholder {{{PLACEHOLDER}}} must occur exactly once, found {seen}")
    return "".join(before), "".join(after)


def canonical_name(dimension: str) -> str:
    """Dimension names are case-insensitive on input but canonical everywhere after."""
    key = dimension.strip().casefold()
    if key not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}; valid: {', '.join(DIMENSIONS)}")
    return key


class PromptTemplate(BaseModel):
    """A validated rating prompt; frozen so that its digest can safely key caches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    language: str
    dimension: str
    text: str
    source: str = "builtin"

    _prefix: str = PrivateAttr(default="")
    _suffix: str = PrivateAttr(default="")

    @field_validator("language")
    @classmethod
    def _language(cls, value: str) -> str:
        key = value.strip().casefold()
        if not key:
            raise ValueError("language must not be empty")
        return key

    @field_validator("dimension")
    @classmethod
    def _dimension(cls, value: str) -> str:
        return canonical_name(value)

    @model_validator(mode="after")
    def _parts(self) -> Self:
        self._prefix, self._suffix = split_text(self.text)
        return self

    @property
    def prefix(self) -> str:
        """Everything before the word: identical for all words, so it is encoded once."""
        return self._prefix

    @property
    def suffix(self) -> str:
        """Everything after the word (often empty)."""
        return self._suffix

    @property
    def digest(self) -> str:
        """Identifies the prompt by what the model sees, so a copy loaded from a file hits the same cache.

        ``source`` is left out on purpose: it records provenance, not content.
        """
        payload = json.dumps(
            {"language": self.language, "dimension": self.dimension, "text": self.text},
            sort_keys=True, ensure_ascii=False, separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def render(self, word: str) -> str:
        """The prompt for one word; the word is inserted verbatim, braces included."""
        return self._prefix + word + self._suffix
