"""Training examples from norms and multiple-choice items, split by word so that no word leaks.

A rating example asks for one word on one dimension, so splitting examples would put the same
word on both sides of a split; the split unit is therefore the word (or the item, for multiple
choice), and every split is a pure function of its keys and a seed, stored with the adapter under
a digest so that a result can always be traced to the words it was tested on.

The ``wu2026`` split tests on the study's 1,572 held-out concepts so that an adapter trained here
is scored on the same words as the study's fine-tuned models; its training concepts are drawn from
the other English-Dutch pairs because the study's own training list was not released.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sensorium.errors import FailedPrecondition, InvalidArgument, NotFound
from sensorium.norms.builtin import DUTCH_SPEED, LANCASTER, LANCASTER_CITATION
from sensorium.norms.declaration import ColumnSpec
from sensorium.norms.dimensions import resolve_dimensions
from sensorium.norms.model import Norms, normalise_word
from sensorium.prompts import PromptTemplate, default_template
from sensorium.prompts.sets import PromptSets
from sensorium.storage import sha256_bytes
from sensorium.training.spec import SplitSpec, TrainingSpec

ANSWER_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
ALL_SUBTASKS = "all"  # the subtask of items whose file gives no way to tell subtasks apart
GIVEN = "given"  # split name for item sets whose test part is fixed by their files

# The study's counts: 3,930 concepts split 60/40 into 2,358 for training and 1,572 held out.
WU2026_TRAIN = 2358
WU2026_TEST = 1572
WU2026_TEST_FILE = Path("model-ratings") / "En_all_models_results.csv"
WU2026_POOL_FILES = (Path("norms-split") / "2_train_sensorimotor_random_sample.csv",
                     Path("norms-split") / "2_test_sensorimotor_random_sample.csv")
WU2026_CITATION = ("Wu, Conde, Reviriego & Brysbaert (2026). How does fine-tuning improve sensorimotor "
                   "representations in large language models? arXiv:2603.03313")


# ---- the interface the training loop consumes ----------------------------------------------
@dataclass(frozen=True)
class Example:
    """One prompt and its answer; ``key`` is the unit that never straddles two parts of a split."""

    key: str  # the split unit: the word (rating) or the item id (choice)
    prompt: str  # instruction text before any chat template (the loop applies the model's chat template)
    target: str  # answer text: rating with 2 decimals, or the option letter
    rating: float | None = None  # rating task: the unrounded human mean, 0..5 (soft and regression targets)
    dimension: str | None = None  # rating task: canonical dimension
    subtask: str | None = None  # choice task
    language: str = "en"


@dataclass(frozen=True)
class Split:
    """Which keys train, validate and test; parts are sorted so equal splits compare and hash equal."""

    name: str  # "random", "wu2026", or "given" (choice items, test part fixed by the files)
    seed: int
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]

    def __post_init__(self) -> None:
        for part in ("train", "validation", "test"):
            object.__setattr__(self, part, tuple(sorted(getattr(self, part))))
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
            shared = set(getattr(self, a)) & set(getattr(self, b))
            if shared:
                shown = ", ".join(repr(k) for k in sorted(shared)[:5])
                raise InvalidArgument(f"split {self.name!r}: {len(shared)} key(s) in both {a} and {b}: {shown}")

    @property
    def digest(self) -> str:
        """Content key of the split: name and seed are left out since two recipes may give one split."""
        parts = {"train": self.train, "validation": self.validation, "test": self.test}
        text = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return sha256_bytes(text.encode("utf-8"))

    def to_json(self) -> dict[str, Any]:
        """The whole split, stored with the adapter so an evaluation can refuse its training words."""
        return {"name": self.name, "seed": self.seed, "digest": self.digest, "train": list(self.train),
                "validation": list(self.validation), "test": list(self.test)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Split:
        """A stored split, checked against its digest so that an edited file is not trusted."""
        try:
            split = cls(name=str(data["name"]), seed=int(data["seed"]), train=tuple(data["train"]),
                        validation=tuple(data["validation"]), test=tuple(data["test"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"not a stored split: {exc!r}") from None
        if "digest" in data and data["digest"] != split.digest:
            raise InvalidArgument(f"stored split {split.name!r}: digest {data['digest']!r} does not match its words")
        return split


@dataclass(frozen=True)
class TrainingData:
    """Everything a run trains and evaluates on, with the split that produced it."""

    task: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    split: Split
    dimensions: tuple[str, ...]  # rating task; empty for choice
    language: str


# ---- rating examples -------------------------------------------------------------------------
def rating_target(value: float) -> str:
    """Two decimals, half up on the number as written, so 2.675 reads "2.68" on every machine.

    Formatting the binary float instead would give "2.67" for some halves and not others, which
    a reader checking targets against the norms file could not predict.
    """
    return str(Decimal(repr(float(value))).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def rating_examples(norms: Norms, words: Sequence[str], dimensions: Sequence[str], language: str,
                    template: Callable[[str, str], PromptTemplate] = default_template) -> list[Example]:
    """One example per word and dimension with a rating; a missing rating gives no example.

    ``template(language, dimension)``: the built-in templates, or a named prompt set's.
    """
    dims = resolve_dimensions(dimensions)
    columns = norms.subset(dims).means  # NotFound names a dimension absent from the norms
    templates = {d: template(language, d) for d in dims}
    keys = [normalise_word(w) for w in words]
    missing = [w for w in keys if w not in norms.index]
    if missing:
        shown = ", ".join(repr(w) for w in missing[:10])
        raise NotFound(f"{norms.dataset}: {len(missing)} word(s) not in the norms: {shown}")
    out: list[Example] = []
    for word in keys:
        row = columns[norms.index[word]]
        for dim, value in zip(dims, row.tolist(), strict=True):
            if math.isnan(value):
                continue
            out.append(Example(key=word, prompt=templates[dim].render(word), target=rating_target(value),
                               rating=value, dimension=dim, language=language))
    return out


# ---- splits ------------------------------------------------------------------------------------
def _count(fraction: float, n: int) -> int:
    """Half-up rounding: Python's round() sends 0.5 to even, which surprises with small sets."""
    return int(math.floor(fraction * n + 0.5))


def _subsample(train: list[str], limit: int | None, rng: np.random.Generator) -> list[str]:
    if limit is None or limit >= len(train):
        return train
    picked = rng.choice(len(train), size=limit, replace=False)
    return [train[i] for i in sorted(picked.tolist())]


def random_split(keys: Sequence[str], spec: SplitSpec) -> Split:
    """Seeded word-level split: sorted keys, one permutation, test first, then validation.

    Sorting first makes the split depend on the set of keys only, not on the order a file lists
    them in; numpy's default generator gives the same permutation for a seed on every platform.
    """
    counts = Counter(keys)
    repeated = [k for k, n in counts.items() if n > 1]
    if repeated:
        raise InvalidArgument(f"split keys must be unique; repeated: {', '.join(map(repr, sorted(repeated)[:10]))}")
    ordered = sorted(counts)
    rng = np.random.default_rng(spec.seed)
    shuffled = [ordered[i] for i in rng.permutation(len(ordered)).tolist()]
    n_test, n_val = _count(spec.test, len(ordered)), _count(spec.validation, len(ordered))
    test, validation, train = shuffled[:n_test], shuffled[n_test:n_test + n_val], shuffled[n_test + n_val:]
    train = _subsample(sorted(train), spec.max_train_words, rng)
    return Split("random", spec.seed, tuple(train), tuple(validation), tuple(test))


# ---- the wu2026 concepts -------------------------------------------------------------------
class Concept(NamedTuple):
    """One English-Dutch translation pair: the unit of the wu2026 split."""

    english: str
    dutch: str


@dataclass(frozen=True, eq=False)
class Wu2026Concepts:
    """The study's held-out concepts, the pairs a training set may be drawn from, and their norms."""

    english: Norms  # Lancaster, 11 dimensions, every English word of ``test`` and ``other``
    dutch: Norms  # Speed & Brysbaert, 6 dimensions, every Dutch word; gloss: the English translation
    test: tuple[Concept, ...]  # the 1,572 held-out concepts, in the released file's order
    other: tuple[Concept, ...]  # complete pairs sharing neither word with ``test``, sorted


def _header_index(header: list[str], spec: ColumnSpec, path: Path) -> int:
    """Exact name first, then case-insensitive: the released files mix capitalisation."""
    for name in [spec] if isinstance(spec, str) else spec:
        if name in header:
            return header.index(name)
        folded = [i for i, h in enumerate(header) if h.casefold() == name.casefold()]
        if len(folded) == 1:
            return folded[0]
    wanted = spec if isinstance(spec, str) else " or ".join(spec)
    raise FailedPrecondition(f"{path}: no column {wanted!r}; is this the study's released file?")


def _number(text: str, path: Path, line: int, column: str, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        if not text.strip() or text.strip().lower() in ("na", "n/a"):
            return math.nan
        raise InvalidArgument(f"{path}: line {line}, column {column!r}: {text!r} is not a number") from None
    if not 0.0 <= value <= high and not math.isnan(value):
        raise InvalidArgument(f"{path}: line {line}, column {column!r}: {value:g} is outside 0..{high:g}")
    return value


_Row = tuple[Concept, tuple[float, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]


def _paired_rows(path: Path) -> list[_Row]:
    """(concept, English means, SDs, rater counts, Dutch means) per row of a joined file."""
    if not path.is_file():
        raise NotFound(f"wu2026: {path} does not exist (the study's released materials)")
    en_dims = tuple(LANCASTER.columns)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        word_at = _header_index(header, LANCASTER.word_column, path)
        dutch_at = _header_index(header, DUTCH_SPEED.word_column, path)
        groups = [(tuple(_header_index(header, mapping[d], path) for d in dims), high) for mapping, dims, high in (
            (LANCASTER.columns, en_dims, 5.0), (LANCASTER.sd_columns, en_dims, math.inf),
            (LANCASTER.n_columns, en_dims, math.inf), (DUTCH_SPEED.columns, tuple(DUTCH_SPEED.columns), 5.0))]
        rows: list[_Row] = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            line = reader.line_num
            cells += [""] * (len(header) - len(cells))
            concept = Concept(normalise_word(cells[word_at]), normalise_word(cells[dutch_at]))
            if not concept.english or not concept.dutch:
                raise InvalidArgument(f"{path}: line {line}: empty English or Dutch word")
            values = [tuple(_number(cells[i], path, line, header[i], high) for i in at) for at, high in groups]
            rows.append((concept, *values))  # type: ignore[arg-type]
    return rows


def _complete(row: _Row) -> bool:
    return not any(math.isnan(v) for v in (*row[1], *row[4]))


@lru_cache(maxsize=4)
def _concepts(paper_dir: Path, stamps: tuple[float, ...]) -> Wu2026Concepts:
    """Parsed once per folder and file version: a trainer builds data for every job it plans."""
    del stamps  # part of the cache key only
    test_path = paper_dir / WU2026_TEST_FILE
    test_rows = _paired_rows(test_path)
    pool_rows = [r for f in WU2026_POOL_FILES for r in _paired_rows(paper_dir / f)]
    test = tuple(r[0] for r in test_rows)
    for language, words in (("English", [c.english for c in test]), ("Dutch", [c.dutch for c in test])):
        repeated = [w for w, n in Counter(words).items() if n > 1]
        if repeated:
            raise InvalidArgument(f"{test_path}: {language} word(s) listed twice: {', '.join(sorted(repeated)[:10])}")
    test_en, test_nl = {c.english for c in test}, {c.dutch for c in test}
    other = sorted({r[0] for r in pool_rows if r[0].english not in test_en and r[0].dutch not in test_nl
                    and _complete(r)})

    # One English word may translate several Dutch words; its Lancaster ratings must agree.
    english: dict[str, tuple[tuple[float, ...], ...]] = {}
    dutch: dict[str, tuple[tuple[float, ...], str]] = {}
    for row in [*test_rows, *pool_rows]:
        concept, values = row[0], (row[1], row[2], row[3])
        seen = english.setdefault(concept.english, values)
        if seen[0] != values[0] and not np.allclose(seen[0], values[0], atol=1e-9, equal_nan=True):
            raise InvalidArgument(f"wu2026: the files disagree on the English ratings of {concept.english!r}")
        seen_nl = dutch.setdefault(concept.dutch, (row[4], concept.english))
        if seen_nl[0] != row[4] and not np.allclose(seen_nl[0], row[4], atol=1e-9, equal_nan=True):
            raise InvalidArgument(f"wu2026: the files disagree on the Dutch ratings of {concept.dutch!r}")
    en_words = sorted(english)
    nl_words = sorted(dutch)
    en_norms = Norms(language="en", dataset="wu2026-en", words=tuple(en_words), dimensions=tuple(LANCASTER.columns),
                     means=np.array([english[w][0] for w in en_words]), sds=np.array([english[w][1] for w in en_words]),
                     n_raters=np.array([english[w][2] for w in en_words]),
                     citation=f"{LANCASTER_CITATION} Joined and split by {WU2026_CITATION}", licence=LANCASTER.licence)
    nl_norms = Norms(language="nl", dataset="wu2026-nl", words=tuple(nl_words), dimensions=tuple(DUTCH_SPEED.columns),
                     means=np.array([dutch[w][0] for w in nl_words]), gloss=tuple(dutch[w][1] for w in nl_words),
                     citation=f"{DUTCH_SPEED.citation} Joined and split by {WU2026_CITATION}",
                     licence=DUTCH_SPEED.licence)
    return Wu2026Concepts(english=en_norms, dutch=nl_norms, test=test, other=tuple(other))


def wu2026_concepts(paper_dir: Path) -> Wu2026Concepts:
    """The study's held-out concepts and the other English-Dutch pairs, with both languages' norms.

    The test concepts and their ratings come from the study's model-ratings file, since several
    hundred of them are absent from the later norms-split re-run; the other pairs come from that
    re-run, minus every pair that shares its English or its Dutch word with a test concept.
    """
    folder = Path(paper_dir).resolve()
    files = [folder / WU2026_TEST_FILE, *(folder / f for f in WU2026_POOL_FILES)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise NotFound(f"wu2026: missing {', '.join(missing)} (the study's released materials)")
    return _concepts(folder, tuple(f.stat().st_mtime for f in files))


def wu2026_concept_split(concepts: Wu2026Concepts, spec: SplitSpec) -> tuple[list[Concept], list[Concept]]:
    """Training and validation concepts, drawn from the pairs outside the study's test set.

    Validation comes from the remaining pairs, not out of the 2,358, so that training keeps the
    study's size exactly and is the same set whatever the validation fraction (a fraction of
    2,358). Pairs are taken in seeded order and skipped when their English or Dutch word is
    already taken, so every word occurs once in each language.
    """
    rng = np.random.default_rng(spec.seed)
    n_val = _count(spec.validation, WU2026_TRAIN)
    taken_en: set[str] = set()
    taken_nl: set[str] = set()
    drawn: list[Concept] = []
    for i in rng.permutation(len(concepts.other)).tolist():
        concept = concepts.other[i]
        if concept.english in taken_en or concept.dutch in taken_nl:
            continue
        taken_en.add(concept.english)
        taken_nl.add(concept.dutch)
        drawn.append(concept)
        if len(drawn) == WU2026_TRAIN + n_val:
            break
    else:
        raise FailedPrecondition(f"wu2026: only {len(drawn)} distinct pairs outside the test concepts; "
                                 f"{WU2026_TRAIN} for training and {n_val} for validation are needed")
    train, validation = sorted(drawn[:WU2026_TRAIN]), sorted(drawn[WU2026_TRAIN:])
    if spec.max_train_words is not None and spec.max_train_words < len(train):
        picked = rng.choice(len(train), size=spec.max_train_words, replace=False)
        train = [train[i] for i in sorted(picked.tolist())]
    return train, validation


def wu2026_split(paper_dir: Path, spec: SplitSpec, language: str) -> tuple[Split, Norms]:
    """The wu2026 split in one language, and that language's norms for exactly its words.

    English and Dutch runs with one seed train, validate and test on the same concepts, each
    in its own words, so their adapters can be compared concept by concept as in the study.
    """
    lang = language.strip().casefold()
    if lang not in ("en", "nl"):
        raise InvalidArgument(f"split 'wu2026' has English and Dutch norms; data.language is {language!r}")
    concepts = wu2026_concepts(paper_dir)
    train, validation = wu2026_concept_split(concepts, spec)
    side = (lambda c: c.english) if lang == "en" else (lambda c: c.dutch)
    parts = [tuple(side(c) for c in part) for part in (train, validation, concepts.test)]
    norms = concepts.english if lang == "en" else concepts.dutch
    split = Split("wu2026", spec.seed, *parts)
    return split, norms.select([*split.train, *split.validation, *split.test])


# ---- multiple choice -------------------------------------------------------------------------
@dataclass(frozen=True)
class ChoiceItem:
    """A four-option question; options are held in letter order A-D."""

    id: str
    question: str
    options: tuple[str, ...]
    answer: str  # one of ANSWER_LETTERS
    subtask: str


_REQUIRED = ("index", "question", "options", "correct_option")
_OPTIONAL = ("subtask",)


def _nonempty(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{where}: {field!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _item(raw: Any, where: str) -> tuple[Any, str, tuple[str, ...], str, str | None]:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: expected an object with {', '.join(_REQUIRED)}, got {type(raw).__name__}")
    absent = [k for k in _REQUIRED if k not in raw]
    if absent:
        raise InvalidArgument(f"{where}: missing field(s) {', '.join(absent)}")
    unknown = sorted(set(raw) - {*_REQUIRED, *_OPTIONAL})
    if unknown:
        raise InvalidArgument(f"{where}: unknown field(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join((*_REQUIRED, *_OPTIONAL))}")
    index = raw["index"]
    if isinstance(index, bool) or not (isinstance(index, int) or (isinstance(index, str) and index.strip())):
        raise InvalidArgument(f"{where}: 'index' must be an integer or a non-empty string, got {index!r}")
    question = _nonempty(raw["question"], where, "question")
    options = raw["options"]
    if not isinstance(options, dict):
        raise InvalidArgument(f"{where}: 'options' must be an object with keys {', '.join(ANSWER_LETTERS)}")
    lacking = [k for k in ANSWER_LETTERS if k not in options]
    if lacking:
        raise InvalidArgument(f"{where}: missing option(s) {', '.join(lacking)}; "
                              f"each item has options {', '.join(ANSWER_LETTERS)}")
    extra = sorted(set(options) - set(ANSWER_LETTERS))
    if extra:
        raise InvalidArgument(f"{where}: unexpected option(s) {', '.join(map(str, extra))}; "
                              f"each item has options {', '.join(ANSWER_LETTERS)}")
    texts = tuple(_nonempty(options[k], where, f"options.{k}") for k in ANSWER_LETTERS)
    answer = raw["correct_option"]
    if answer not in ANSWER_LETTERS:
        raise InvalidArgument(f"{where}: 'correct_option' {answer!r} is not among the options "
                              f"{', '.join(ANSWER_LETTERS)}")
    subtask = _nonempty(raw["subtask"], where, "subtask") if "subtask" in raw else None
    return index, question, texts, answer, subtask


def load_choice_items(path: Path) -> list[ChoiceItem]:
    """PerceptualQA-shaped items, refused whole at the first bad one so a file is never half-used.

    The subtask is the item's ``subtask`` field where given, else PerceptualQA's convention (the
    thousands digit of an integer ``index``) when every index of the file is an integer of at
    least 1000, else "all": other numbering schemes carry no subtask to recover.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"multiple-choice items: {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise InvalidArgument(f"{path}: expected a non-empty JSON list of items")
    parsed = []
    first: dict[str, int] = {}
    for position, raw in enumerate(data):
        label = raw.get("index") if isinstance(raw, dict) else None
        where = f"{path}: item {position}" + (f" (index {label!r})" if label is not None else "")
        index, question, options, answer, subtask = _item(raw, where)
        key = str(index).strip()
        if key in first:
            raise InvalidArgument(f"{where}: duplicate index {key!r} (also item {first[key]})")
        first[key] = position
        parsed.append((index, key, question, options, answer, subtask))
    thousands = all(isinstance(p[0], int) and p[0] >= 1000 for p in parsed)
    return [ChoiceItem(id=key, question=question, options=options, answer=answer,
                       subtask=subtask or (str(index // 1000) if thousands else ALL_SUBTASKS))
            for index, key, question, options, answer, subtask in parsed]


def choice_prompt(item: ChoiceItem) -> str:
    """Question, lettered options, then the instruction to reply with a letter alone."""
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(ANSWER_LETTERS, item.options, strict=True))
    return (f"Answer the multiple-choice question below. Exactly one option is correct.\n\n"
            f"Question: {item.question}\n\nOptions:\n{options}\n\n"
            f"Answer with the letter only: {', '.join(ANSWER_LETTERS[:-1])} or {ANSWER_LETTERS[-1]}.")


def choice_example(item: ChoiceItem) -> Example:
    return Example(key=item.id, prompt=choice_prompt(item), target=item.answer, subtask=item.subtask, language="en")


def _stratified(items: Sequence[ChoiceItem], fraction: float, rng: np.random.Generator) -> set[str]:
    """Ids for validation, each subtask in proportion (largest remainders), so per-subtask
    accuracy on validation is measured on the same mix as training and test."""
    groups: dict[str, list[str]] = defaultdict(list)
    for item in items:
        groups[item.subtask].append(item.id)
    names = sorted(groups)
    total = _count(fraction, len(items))
    quotas = [fraction * len(groups[n]) for n in names]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(names)), key=lambda i: (-(quotas[i] - counts[i]), names[i]))
    for i in by_remainder[:max(0, total - sum(counts))]:
        counts[i] += 1
    chosen: set[str] = set()
    for name, count in zip(names, counts, strict=True):
        ids = sorted(groups[name])
        chosen.update(ids[i] for i in rng.permutation(len(ids))[:count].tolist())
    return chosen


def choice_split(train: Sequence[ChoiceItem], test: Sequence[ChoiceItem], spec: SplitSpec) -> Split:
    """The files fix the test part; validation is a seeded, subtask-stratified share of training."""
    overlap = sorted({i.id for i in train} & {i.id for i in test})
    if overlap:
        raise InvalidArgument(f"multiple-choice items: {len(overlap)} index(es) in both the training and the test "
                              f"file: {', '.join(overlap[:10])}")
    rng = np.random.default_rng(spec.seed)
    validation = _stratified(train, spec.validation, rng)
    rest = sorted(i.id for i in train if i.id not in validation)
    return Split(GIVEN, spec.seed, tuple(_subsample(rest, spec.max_train_words, rng)), tuple(validation),
                 tuple(i.id for i in test))


# ---- from a spec to data -------------------------------------------------------------------
def _check_parts(data: TrainingData, required: Iterable[str], detail: str) -> TrainingData:
    for part in required:
        if not getattr(data, part):
            raise InvalidArgument(f"no data left after filtering: the {part} part has no examples ({detail})")
    return data


def rating_split(spec: TrainingSpec, norms: Callable[[str], Norms],
                 paper_dir: Path | None) -> tuple[Split, Norms, tuple[str, ...]]:
    """The word split a rating spec names, the norms its words come from, and the dimensions it rates.

    Experiments call this too, to test on exactly the words a fine-tuning held out.
    """
    data, split_spec = spec.data, spec.data.split
    language = data.language.strip().casefold()
    if split_spec.kind == "wu2026":
        if paper_dir is None:
            raise FailedPrecondition("split 'wu2026' needs the study's released materials, and this trainer "
                                     "has no paper_dir configured")
        split, source = wu2026_split(paper_dir, split_spec, language)
    else:
        source = norms(data.norms)
        if source.language != language:
            raise InvalidArgument(f"norms {data.norms!r} are in language {source.language!r} but data.language "
                                  f"is {data.language!r}: prompts and words must share one language")
    dims = resolve_dimensions(data.dimensions) if data.dimensions else source.dimensions
    means = source.subset(dims).means  # NotFound names a dimension these norms lack
    if split_spec.kind != "wu2026":
        rated = np.isfinite(means).any(axis=1)
        if data.words:
            unknown = sorted(set(data.words) - set(source.words))
            if unknown:
                raise InvalidArgument(f"data.words: {len(unknown)} words are not in norms {source.dataset!r}, "
                                      f"e.g. {', '.join(map(repr, unknown[:5]))}")
            rated &= np.isin(np.asarray(source.words, dtype=object), list(set(data.words)))
        split = random_split([w for w, keep in zip(source.words, rated.tolist(), strict=True) if keep], split_spec)
    return split, source, tuple(dims)


def _rating_data(spec: TrainingSpec, norms: Callable[[str], Norms], paper_dir: Path | None,
                 prompts: PromptSets) -> TrainingData:
    split, source, dims = rating_split(spec, norms, paper_dir)
    language, split_spec = spec.data.language.strip().casefold(), spec.data.split
    template = partial(prompts.template, spec.data.prompts)
    parts = {p: rating_examples(source, getattr(split, p), dims, language, template)
             for p in ("train", "validation", "test")}
    result = TrainingData("rating", parts["train"], parts["validation"], parts["test"], split, dims, language)
    required = ["train", *(["validation"] if split_spec.validation > 0 else []),
                *(["test"] if split_spec.kind == "wu2026" or split_spec.test > 0 else [])]
    return _check_parts(result, required, f"norms {source.dataset!r}, dimensions {', '.join(dims)}")


def _choice_data(spec: TrainingSpec,
                 choice_items: Callable[[str], tuple[list[ChoiceItem], list[ChoiceItem]]]) -> TrainingData:
    data = spec.data
    if data.split.kind != "random":
        raise InvalidArgument(f"split {data.split.kind!r} splits words; multiple-choice items come split by "
                              "their files (use kind 'random' for the validation share)")
    if data.dimensions:
        raise InvalidArgument("data.dimensions applies to task 'rating' only")
    if data.language.strip().casefold() != "en":
        raise InvalidArgument(f"multiple-choice prompts are in English; data.language is {data.language!r}")
    train_items, test_items = choice_items(data.choice_items)
    split = choice_split(train_items, test_items, data.split)
    by_id = {i.id: i for i in [*train_items, *test_items]}
    parts = {p: [choice_example(by_id[k]) for k in getattr(split, p)] for p in ("train", "validation", "test")}
    result = TrainingData("choice", parts["train"], parts["validation"], parts["test"], split, (), "en")
    required = ["train", "test", *(["validation"] if data.split.validation > 0 else [])]
    return _check_parts(result, required, f"items {data.choice_items!r}")


def build_training_data(spec: TrainingSpec, *, norms: Callable[[str], Norms],
                        choice_items: Callable[[str], tuple[list[ChoiceItem], list[ChoiceItem]]],
                        paper_dir: Path | None, prompts: PromptSets | None = None) -> TrainingData:
    """The examples a spec names, split and filtered; names resolve through the callables only.

    The callables belong to the service, which decides what a name means, so that a spec can
    never make the trainer read an arbitrary path. Split ``wu2026`` brings its own norms and
    ignores ``data.norms``. ``prompts``: the prompt sets ``data.prompts`` may name (the service's).
    """
    if spec.task == "choice":
        return _choice_data(spec, choice_items)
    return _rating_data(spec, norms, paper_dir, prompts or PromptSets())
