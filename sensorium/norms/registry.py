"""Published norms known by name: one dataset declaration per file in ``datasets/``.

The declarations ship inside the package; the data files do not (their licences differ, and
several are large), so each declaration names its file relative to a norms data root that the
user supplies: a folder holding one sub-folder per dataset, such as the project's shared
``data/norms``. A dataset not listed here needs no code either: a YAML declaration in the same
schema is loaded by path (``load_norms("my-norms.yaml")``), its file taken from the YAML's folder.

Registered are the datasets whose scales are Lancaster dimensions: the eleven perceptual and
action strengths, or a subset of them. Left out on purpose, because their scales measure
something else and mapping them onto a sensorimotor dimension would be a guess:

- glasgow-scott2019: nine non-sensorimotor scales (arousal, valence, concreteness, ...);
- brysbaert2014-concreteness: concreteness, one scale;
- french-bonin2015-ser, spanish-diezalamo2019-ser: overall sensory experience, one scale that
  does not say through which sense;
- spanish-diezalamo2018-attributes and medler2005-wisconsin-norare: attribute salience (colour,
  motion, grasp, pain, sound, manipulation, ...), a different question from perceptual strength.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

from sensorium.errors import InvalidArgument, NotFound
from sensorium.norms.declaration import DatasetDeclaration
from sensorium.norms.model import Norms
from sensorium.norms.reader import load_declared

_PACKAGE = "sensorium.norms"
_FOLDER = "datasets"


@cache
def registered() -> dict[str, DatasetDeclaration]:
    """Name -> declaration of every registered dataset, read once from the package."""
    out: dict[str, DatasetDeclaration] = {}
    for entry in sorted(files(_PACKAGE).joinpath(_FOLDER).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        source = f"registered {entry.name}"
        decl = DatasetDeclaration.from_text(entry.read_text(encoding="utf-8"), source)
        if decl.name != entry.name.removesuffix(".yaml"):
            raise InvalidArgument(f"{source}: name {decl.name!r} differs from the file name")
        out[decl.name] = decl
    return out


def registered_declaration(name: str) -> DatasetDeclaration:
    """The declaration of a registered dataset, by name (case-insensitive)."""
    key = name.strip().casefold()
    if key not in registered():
        raise NotFound(f"no registered norms {name!r}; registered: {', '.join(registered())}")
    return registered()[key]


def load_registered(name: str, root: str | Path) -> Norms:
    """A registered dataset read from under ``root``, the folder holding one sub-folder per dataset."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise NotFound(f"norms data root {folder} is not a folder")
    return load_declared(registered_declaration(name).under(folder))


def registered_languages() -> tuple[str, ...]:
    """Every language some registered dataset is in, so prompts can be checked to cover them."""
    return tuple(sorted({decl.language for decl in registered().values()}))
