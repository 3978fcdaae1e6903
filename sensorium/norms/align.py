"""Concept pairs across languages: which word of a target language stands for which English word.

Comparing a model's Italian ratings with its English ones, or Chinese norms with Lancaster's,
needs the same concepts on both sides. Pairs come from three sources, used in the order asked:

- ``gloss``: the target dataset's English gloss column. A gloss pairs its word with the English
  word spelt the same (both normalised: lower-case, stripped, NFC). The gloss must match as a
  whole: "speak; speech" or "to eat" pair with nothing and a multi-word gloss pairs only with a
  multi-word English entry ("ice cream"). Nothing is split or stemmed, so no pair rests on a guess.
- ``concept``: the gloss is a concept label that the English dataset carries as well (NoRaRe's
  Concepticon glosses); the target word pairs with the English word of the same label.
- ``table``: a translation table (target word, English word), filtered as its declaration says,
  such as the study's English-Dutch table with its back-translation check (``Include?`` = 1).

Pairs are one to one. Candidates are taken in order (sources in the order given, each source in
file order) and a pair is kept only when neither of its words is paired yet; so when several
target words share a gloss, the first in file order keeps it. Both words must have norms.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from sensorium.errors import InvalidArgument, NotFound
from sensorium.norms.layout import FileLayout
from sensorium.norms.model import Norms, normalise_word
from sensorium.norms.table import read_table
from sensorium.storage import atomic_write_bytes, sha256_bytes

Pair = tuple[str, str]  # (target word, English word)
Source = Literal["gloss", "concept", "table"]


class TranslationTable(FileLayout):
    """A file of translation pairs: which column holds the target word and which its English one."""

    kind: ClassVar[str] = "translation table declaration"
    noun: ClassVar[str] = "translation table"

    target_column: str
    english_column: str


WU2026_TRANSLATIONS = TranslationTable.parse(
    {
        "name": "wu2026-nl-en",
        "format": "csv",
        "target_column": "Original_word",
        "english_column": "Deepl_translation_English",
        "keep_rows": {"Include?": ["1"]},  # the DeepL translation survived back-translation
    },
    "built-in translation table 'wu2026-nl-en'",
)


def table_pairs(table: TranslationTable) -> list[Pair]:
    """The table's kept rows as normalised pairs, in file order; rows missing either word are skipped."""
    data = read_table(table)
    target_at, english_at = data.column(table.target_column)[1], data.column(table.english_column)[1]
    pairs = ((normalise_word(cells[target_at]), normalise_word(cells[english_at])) for _, cells in data.rows)
    return [(t, e) for t, e in pairs if t and e]


def _glosses(norms: Norms, role: str) -> tuple[str | None, ...]:
    if norms.gloss is None:
        raise InvalidArgument(f"{role} norms {norms.dataset!r} have no gloss column to align by")
    return norms.gloss


def gloss_overlap(target: Norms, english: Norms) -> frozenset[str]:
    """The distinct glosses that are English words: how many concepts a gloss alignment can reach."""
    return frozenset(g for g in _glosses(target, "target") if g is not None and g in english.index)


def _by_gloss(target: Norms) -> Iterator[Pair]:
    return ((w, g) for w, g in zip(target.words, _glosses(target, "target"), strict=True) if g is not None)


def _by_concept(target: Norms, english: Norms) -> Iterator[Pair]:
    label_to_word: dict[str, str] = {}
    for word, label in zip(english.words, _glosses(english, "English"), strict=True):
        if label is not None:
            label_to_word.setdefault(label, word)  # first in file order, like every other tie
    return ((w, label_to_word[g]) for w, g in _by_gloss(target) if g in label_to_word)


def one_to_one(candidates: Iterable[Pair]) -> tuple[Pair, ...]:
    """Candidates in order, each kept only when neither of its words is paired yet."""
    taken_target: set[str] = set()
    taken_english: set[str] = set()
    out: list[Pair] = []
    for target, english in candidates:
        if target in taken_target or english in taken_english:
            continue
        taken_target.add(target)
        taken_english.add(english)
        out.append((target, english))
    return tuple(out)


def _digest(pairs: Sequence[Pair]) -> str:
    """Identifies the concept list by content, whichever datasets or sources produced it."""
    payload = json.dumps([list(p) for p in pairs], ensure_ascii=False, separators=(",", ":"))
    return sha256_bytes(payload.encode("utf-8"))


@dataclass(frozen=True)
class Alignment:
    """The concept list of a target dataset and an English one, with the digest that names it."""

    target: str
    language: str
    english: str
    sources: tuple[str, ...]
    pairs: tuple[Pair, ...]

    @property
    def digest(self) -> str:
        return _digest(self.pairs)

    @property
    def target_words(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.pairs)

    @property
    def english_words(self) -> tuple[str, ...]:
        return tuple(e for _, e in self.pairs)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "language": self.language, "english": self.english,
                "sources": list(self.sources), "pairs": [list(p) for p in self.pairs], "digest": self.digest}

    def save(self, path: str | Path) -> None:
        """Written atomically, so a reader never sees half a concept list."""
        text = json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n"
        atomic_write_bytes(Path(path), text.encode("utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> Alignment:
        """A saved concept list, refused when its pairs no longer match the digest it was saved with."""
        file = Path(path)
        if not file.is_file():
            raise NotFound(f"concept alignment {file} does not exist")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            pairs = tuple((str(t), str(e)) for t, e in data["pairs"])
            alignment = cls(str(data["target"]), str(data["language"]), str(data["english"]),
                            tuple(map(str, data["sources"])), pairs)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"{file}: not a saved concept alignment ({exc})") from None
        if data.get("digest") != alignment.digest:
            raise InvalidArgument(f"{file}: the pairs do not match the saved digest; the file was edited or damaged")
        return alignment


def _candidates(source: str, target: Norms, english: Norms, table: TranslationTable | None) -> Iterator[Pair]:
    if source == "gloss":
        return _by_gloss(target)
    if source == "concept":
        return _by_concept(target, english)
    if source == "table":
        if table is None:
            raise InvalidArgument("alignment by 'table' needs a translation table")
        return iter(table_pairs(table))
    raise InvalidArgument(f"unknown alignment source {source!r}; use gloss, concept or table")


def align(target: Norms, english: Norms, by: Sequence[Source] = ("gloss",), *,
          table: TranslationTable | None = None, path: str | Path | None = None) -> Alignment:
    """One-to-one concept pairs of ``target`` and ``english`` (rules in the module docstring), saved if ``path``."""
    if not by:
        raise InvalidArgument("no alignment source given; use gloss, concept or table")
    candidates = (pair for source in by for pair in _candidates(source, target, english, table)
                  if pair[0] in target.index and pair[1] in english.index)
    alignment = Alignment(target.dataset, target.language, english.dataset, tuple(by), one_to_one(candidates))
    if path is not None:
        alignment.save(path)
    return alignment
