"""Named prompt sets besides the built-ins: a study's own prompt files, read by path on the server.

A set is a folder. It may hold ``<dimension>_prompt.txt`` files as studies release them (the
dimension named in English, ``foot``/``hand`` for the motor effectors, or by the Dutch verbs
``Zien``, ``Horen``, ``Voelen``, ``Proeven``, ``Ruiken``, ``Sensaties``, which make the prompt
Dutch) and ``<language>.yaml`` files in the built-in schema. Clients name a set; only the
service's settings map names to folders, so a request can never make a service read a path.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

from sensorium.errors import InvalidArgument, NotFound
from sensorium.norms.dimensions import canonical_dimension
from sensorium.prompts.builtin import default_template
from sensorium.prompts.files import load_template, load_template_set
from sensorium.prompts.template import PromptTemplate

PROMPT_SUFFIX = "_prompt.txt"
# file stems that name a dimension in Dutch: the Speed & Brysbaert modality verbs
_DUTCH_STEMS = frozenset({"zien", "horen", "voelen", "proeven", "ruiken", "sensaties"})

PromptKey = tuple[str, str]  # (language, canonical dimension)


def load_prompt_folder(folder: str | Path) -> dict[PromptKey, PromptTemplate]:
    """Every template of a prompt-set folder, keyed by language and canonical dimension."""
    root = Path(folder)
    if not root.is_dir():
        raise NotFound(f"prompt folder {root} does not exist")
    out: dict[PromptKey, PromptTemplate] = {}

    def add(template: PromptTemplate, source: Path) -> None:
        key = (template.language, template.dimension)
        if key in out:
            raise InvalidArgument(f"{source}: a second {key[0]} template for {key[1]!r} in {root}")
        out[key] = template

    for path in sorted(root.iterdir()):
        if path.name.endswith(PROMPT_SUFFIX):
            stem = path.name[: -len(PROMPT_SUFFIX)]
            dimension = canonical_dimension(stem)
            if dimension is None:
                raise InvalidArgument(f"{path}: {stem!r} names no sensorimotor dimension")
            language = "nl" if stem.casefold() in _DUTCH_STEMS else "en"
            add(load_template(path, language, dimension), path)
        elif path.suffix in (".yaml", ".yml"):
            for template in load_template_set(path).values():
                add(template, path)
    if not out:
        raise InvalidArgument(f"prompt folder {root} holds no *{PROMPT_SUFFIX} or .yaml templates")
    return out


class PromptSets:
    """The built-in templates (set ``""``) and the named folders a service was configured with."""

    def __init__(self, folders: Mapping[str, str | Path] | None = None) -> None:
        self._folders = {k: Path(v) for k, v in (folders or {}).items()}
        self._loaded: dict[str, dict[PromptKey, PromptTemplate]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted(self._folders)

    def _set(self, name: str) -> dict[PromptKey, PromptTemplate]:
        if name not in self._folders:
            known = ", ".join(self.names()) or "none"
            raise NotFound(f"unknown prompt set {name!r}; this service offers: {known} (and the built-ins, \"\")")
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = load_prompt_folder(self._folders[name])
            return self._loaded[name]

    def dimensions(self, name: str, language: str) -> list[str]:
        """The dimensions a named set has templates for in ``language``."""
        lang = language.strip().casefold()
        return [d for (lg, d) in self._set(name) if lg == lang]

    def template(self, name: str, language: str, dimension: str) -> PromptTemplate:
        if not name:
            return default_template(language, dimension)
        lang, dim = language.strip().casefold(), dimension.strip().casefold()
        templates = self._set(name)
        if (lang, dim) not in templates:
            have = ", ".join(f"{lg}/{d}" for lg, d in templates)
            raise NotFound(f"prompt set {name!r} has no {lang} template for {dimension!r}; it has: {have}")
        return templates[lang, dim]
