"""Templates supplied by users: one plain-text prompt, or a YAML set in the built-in schema.

Prompt files released with published studies name their placeholder ``{Word}`` or ``{Woord}``;
they are accepted as they are and normalised to ``{word}`` so that one template type serves all.
"""

from __future__ import annotations

from pathlib import Path
from string import Formatter
from typing import Any

import yaml
from pydantic import ValidationError

from sensorium.errors import InvalidArgument, NotFound
from sensorium.prompts.template import PLACEHOLDER, PromptTemplate

# Tried in order when the caller does not name the placeholder.
PLACEHOLDERS: tuple[str, ...] = ("{word}", "{Word}", "{Woord}")


def _escape(literal: str) -> str:
    return literal.replace("{", "{{").replace("}", "}}")


def normalise_placeholder(text: str, placeholder: str | None = None) -> str:
    """``text`` with its placeholder field renamed to ``{word}``; other fields are left to validation.

    The text is parsed as a format string rather than searched, so an escaped ``{{Word}}`` stays
    literal text instead of being mistaken for the placeholder.
    """
    try:
        parts = list(Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"malformed braces ({exc}); write literal braces as {{{{ and }}}}") from None
    fields = [f for _, f, _, _ in parts if f is not None]
    if placeholder is None:
        candidates = [p.strip("{}") for p in PLACEHOLDERS]
        found = sorted({f for f in fields if f in candidates})
        if len(found) > 1:
            raise ValueError(f"ambiguous placeholder: found {', '.join('{' + f + '}' for f in found)}")
        if not found:
            raise ValueError(f"no placeholder found; expected one of {', '.join(PLACEHOLDERS)}")
        name = found[0]
    else:
        name = placeholder.strip()
        if name.startswith("{") and name.endswith("}"):
            name = name[1:-1]
        if not name:
            raise ValueError("empty placeholder name")
    out: list[str] = []
    for literal, field, spec, conversion in parts:
        out.append(_escape(literal))
        if field is None:
            continue
        if field == name:
            field = PLACEHOLDER
        out.append("{" + field + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}")
    return "".join(out)


def template_from_text(
    text: str, language: str, dimension: str, source: str, placeholder: str | None = None
) -> PromptTemplate:
    """The one path from raw text to a template, so files and built-ins obey the same rules."""
    try:
        body = normalise_placeholder(text, placeholder)
        return PromptTemplate(language=language, dimension=dimension, text=body, source=source)
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise InvalidArgument(f"{source}: invalid prompt template ({dimension}): {problems}") from None
    except ValueError as exc:
        raise InvalidArgument(f"{source}: invalid prompt template ({dimension}): {exc}") from None


def _read(path: Path) -> str:
    if not path.is_file():
        raise NotFound(f"prompt template file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_template(
    path: str | Path, language: str, dimension: str, placeholder: str | None = None
) -> PromptTemplate:
    """A template from a plain-text file, taken verbatim apart from trailing whitespace.

    A trailing newline (which editors add) is dropped because it would otherwise become part of
    the suffix that the model sees after every word.
    """
    file = Path(path)
    return template_from_text(_read(file).rstrip(), language, dimension, str(file), placeholder)


def templates_from_mapping(data: Any, source: str, expected_language: str | None = None) -> dict[str, PromptTemplate]:
    """Validate a parsed template set: ``language`` plus dimension -> text, nothing else."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"{source}: expected a mapping of dimension -> prompt text with a 'language' key")
    language = data.get("language")
    if not isinstance(language, str) or not language.strip():
        raise InvalidArgument(f"{source}: missing or empty top-level 'language'")
    if expected_language is not None and language.strip().casefold() != expected_language:
        raise InvalidArgument(f"{source}: language {language!r} does not match the file name {expected_language!r}")
    out: dict[str, PromptTemplate] = {}
    for key, text in data.items():
        if key == "language":
            continue
        if not isinstance(key, str) or not isinstance(text, str):
            raise InvalidArgument(f"{source}: {key!r} must map a dimension name to prompt text")
        template = template_from_text(text, language, key, source)
        if template.dimension in out:
            raise InvalidArgument(f"{source}: dimension {template.dimension!r} given twice")
        out[template.dimension] = template
    if not out:
        raise InvalidArgument(f"{source}: no prompt templates (only 'language')")
    return out


def parse_yaml(text: str, source: str) -> Any:
    """YAML syntax errors become the caller's error, naming the file, like every other problem in it."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{source}: not valid YAML ({exc})") from None


def load_template_set(path: str | Path) -> dict[str, PromptTemplate]:
    """All templates of one YAML file, keyed by canonical dimension, in the schema of the built-ins."""
    file = Path(path)
    return templates_from_mapping(parse_yaml(_read(file), str(file)), str(file))
