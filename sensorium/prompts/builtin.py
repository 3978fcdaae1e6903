"""The templates shipped inside the package as YAML data files.

They are data rather than code so that a wording change is reviewable as text and users can
copy a built-in file as the starting point for their own set (same schema, same loader).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from sensorium.errors import NotFound
from sensorium.norms.dimensions import DIMENSIONS
from sensorium.prompts.files import parse_yaml, templates_from_mapping
from sensorium.prompts.template import PromptTemplate

_PACKAGE = "sensorium.prompts"
_FOLDER = "templates"


@cache
def _languages() -> tuple[str, ...]:
    folder = files(_PACKAGE).joinpath(_FOLDER)
    return tuple(sorted(e.name.removesuffix(".yaml") for e in folder.iterdir() if e.name.endswith(".yaml")))


@cache
def _load(language: str) -> dict[str, PromptTemplate]:
    resource = files(_PACKAGE).joinpath(_FOLDER, f"{language}.yaml")
    data = parse_yaml(resource.read_text(encoding="utf-8"), f"builtin {language}.yaml")
    loaded = templates_from_mapping(data, "builtin", expected_language=language)
    return {d: loaded[d] for d in DIMENSIONS if d in loaded}


def available() -> dict[str, tuple[str, ...]]:
    """Built-in language -> dimensions it has templates for, in canonical dimension order."""
    return {lang: tuple(_load(lang)) for lang in _languages()}


def default_template(language: str, dimension: str) -> PromptTemplate:
    """The built-in template for a language and dimension."""
    lang = language.strip().casefold()
    if lang not in _languages():
        raise NotFound(f"no built-in prompt templates for language {language!r}; available: {', '.join(_languages())}")
    templates = _load(lang)
    dim = dimension.strip().casefold()
    if dim not in templates:
        raise NotFound(
            f"no built-in {lang} prompt template for dimension {dimension!r}; available: {', '.join(templates)}"
        )
    return templates[dim]
