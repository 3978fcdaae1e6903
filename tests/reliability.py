"""Figures of the reliability suites (fuzzing, faults, load, security), gathered across test files.

Each suite records what it measured under its own section; at the end of the run the sections
are merged into ``var/reliability/figures.json`` (each stamped with when and where it was
measured), and ``bench/reliability_readme.py`` writes README's Reliability section from that
file, so the README's figures are the ones a run produced, never typed in by hand.

``SENSORIUM_RELIABILITY=heavy`` (``make test-reliability``) scales every suite up: ten times
the fuzzed requests, more clients and requests under load, and hypothesis's random seed
instead of the fixed one ``make test`` uses.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "var" / "reliability" / "figures.json"
HEAVY = os.environ.get("SENSORIUM_RELIABILITY", "").strip().lower() == "heavy"

_sections: dict[str, dict[str, Any]] = {}


def record(section: str, key: str, value: Any) -> None:
    """Keep ``value`` (JSON-able) as ``section.key`` of this run's figures."""
    _sections.setdefault(section, {})[key] = value


def recorded() -> dict[str, dict[str, Any]]:
    return _sections


def write(path: Path = FIGURES) -> Path | None:
    """Merge this run's sections into ``path`` (sections not run this time keep their last figures)."""
    if not _sections:
        return None
    from sensorium.storage import atomic_write_json

    try:
        existing = json.loads(path.read_text())["sections"] if path.exists() else {}
    except (ValueError, KeyError, TypeError):
        existing = {}  # a damaged file is replaced, not merged
    stamp = {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S %z"), "heavy": HEAVY,
             "cpus": os.cpu_count(), "python": platform.python_version()}
    for name, figures in _sections.items():
        existing[name] = {**figures, "_run": stamp}
    atomic_write_json(path, {"sections": existing})
    return path
