"""The templates shipped inside the package as YAML data files, and their versions for other languages.

They are data rather than code so that a wording change is reviewable as text and users can
copy a built-in file as the starting point for their own set (same schema, same loader).

A language without its own file is rated with the English instructions, asking for the judgement
of a native speaker of that language (as the study's Dutch prompts do): only the native-speaker
line of ``en.yaml`` changes, so every language is asked the same question and the English and
Dutch templates (and the caches keyed by their digests) stay exactly as they are.
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
# Every language some norms are registered in, and a few more; codes as the norms declare them.
LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "nl": "Dutch", "it": "Italian", "zh": "Chinese", "hr": "Croatian",
    "ru": "Russian", "fr": "French", "es": "Spanish", "de": "German",
}
_SPEAKER = "Answer as a native speaker of {}."


@cache
def _languages() -> tuple[str, ...]:
    """Languages with their own template file."""
    folder = files(_PACKAGE).joinpath(_FOLDER)
    return tuple(sorted(e.name.removesuffix(".yaml") for e in folder.iterdir() if e.name.endswith(".yaml")))


@cache
def _load(language: str) -> dict[str, PromptTemplate]:
    resource = files(_PACKAGE).joinpath(_FOLDER, f"{language}.yaml")
    data = parse_yaml(resource.read_text(encoding="utf-8"), f"builtin {language}.yaml")
    loaded = templates_from_mapping(data, "builtin", expected_language=language)
    return {d: loaded[d] for d in DIMENSIONS if d in loaded}


@cache
def _english_instructions(language: str) -> dict[str, PromptTemplate]:
    """``en.yaml`` with its native-speaker line naming ``language`` instead of English."""
    english, native = _SPEAKER.format(LANGUAGE_NAMES["en"]), _SPEAKER.format(LANGUAGE_NAMES[language])
    out: dict[str, PromptTemplate] = {}
    for dim, template in _load("en").items():
        if template.text.count(english) != 1:
            raise RuntimeError(f"builtin en.yaml: the {dim} template must contain {english!r} exactly once")
        out[dim] = PromptTemplate(language=language, dimension=dim, text=template.text.replace(english, native))
    return out


def _templates(language: str) -> dict[str, PromptTemplate]:
    lang = language.strip().casefold()
    if lang in _languages():
        return _load(lang)
    if lang in LANGUAGE_NAMES:
        return _english_instructions(lang)
    known = ", ".join(sorted({*_languages(), *LANGUAGE_NAMES}))
    raise NotFound(f"no built-in prompt templates for language {language!r}; available: {known}")


def available() -> dict[str, tuple[str, ...]]:
    """Built-in language -> dimensions it has templates for, in canonical dimension order."""
    return {lang: tuple(_templates(lang)) for lang in sorted({*_languages(), *LANGUAGE_NAMES})}


def default_template(language: str, dimension: str) -> PromptTemplate:
    """The built-in template for a language and dimension: its own file's, else English instructions."""
    templates = _templates(language)
    dim = dimension.strip().casefold()
    if dim not in templates:
        raise NotFound(
            f"no built-in {language.strip().casefold()} prompt template for dimension {dimension!r}; "
            f"available: {', '.join(templates)}"
        )
    return templates[dim]
