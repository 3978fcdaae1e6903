"""Training data: word-level splits, rating and multiple-choice examples, the wu2026 split."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import PAPER, need_shared
from sensorium.errors import FailedPrecondition, InvalidArgument, NotFound
from sensorium.norms import Norms
from sensorium.prompts import default_template
from sensorium.training.data import (
    ANSWER_LETTERS,
    ChoiceItem,
    Split,
    build_training_data,
    choice_example,
    choice_prompt,
    load_choice_items,
    random_split,
    rating_examples,
    rating_target,
    wu2026_concept_split,
    wu2026_concepts,
    wu2026_split,
)
from sensorium.training.spec import SplitSpec, TrainingSpec

SENSORY = ("auditory", "gustatory", "haptic", "interoceptive", "olfactory", "visual")


def random_words(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = {"".join(rng.choice(letters, size=int(rng.integers(3, 10)))) for _ in range(n * 2)}
    return sorted(words)[:n]


def synthetic_norms(n: int = 200, seed: int = 0, language: str = "en") -> Norms:
    words = random_words(n, seed)
    means = np.random.default_rng(seed).uniform(0, 5, size=(len(words), len(SENSORY)))
    return Norms(language=language, dataset="synthetic", words=tuple(words), dimensions=SENSORY, means=means)


def no_items(name: str) -> Any:
    raise AssertionError("choice items must not be read for a rating run")


# ---- random splits -----------------------------------------------------------------------
def test_random_split_is_disjoint_complete_and_proportional() -> None:
    keys = random_words(1000)
    split = random_split(keys, SplitSpec(seed=3, validation=0.1, test=0.2))
    assert (len(split.train), len(split.validation), len(split.test)) == (700, 100, 200)
    parts = [set(split.train), set(split.validation), set(split.test)]
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert set().union(*parts) == set(keys)


def test_random_split_depends_on_the_seed_and_the_key_set_only() -> None:
    keys = random_words(500)
    spec = SplitSpec(seed=7)
    a = random_split(keys, spec)
    b = random_split(list(reversed(keys)), spec)  # input order must not matter
    assert a == b and a.digest == b.digest
    c = random_split(keys, SplitSpec(seed=8))
    assert c.test != a.test and c.digest != a.digest


def test_random_split_is_the_same_on_every_machine() -> None:
    """Pinned: the split a stored adapter names must be recomputable anywhere."""
    split = random_split([f"w{i:02d}" for i in range(20)], SplitSpec(seed=0, validation=0.1, test=0.2))
    assert split.test == ("w02", "w04", "w06", "w19") and split.validation == ("w13", "w16")
    assert split.digest == "bea671ddadb01a9792cb798b7c064c01a86cdbaa85e95d52c567e70574fac7f6"


def test_max_train_words_subsamples_training_only() -> None:
    keys = random_words(400)
    full = random_split(keys, SplitSpec(seed=1))
    small = random_split(keys, SplitSpec(seed=1, max_train_words=50))
    assert len(small.train) == 50 and set(small.train) <= set(full.train)
    assert (small.validation, small.test) == (full.validation, full.test)
    assert small == random_split(keys, SplitSpec(seed=1, max_train_words=50))
    assert random_split(keys, SplitSpec(seed=1, max_train_words=10_000)) == full


def test_split_refuses_repeated_or_overlapping_keys() -> None:
    with pytest.raises(InvalidArgument, match="repeated: 'a'"):
        random_split(["a", "b", "a"], SplitSpec())
    with pytest.raises(InvalidArgument, match="in both train and test"):
        Split("random", 0, ("a", "b"), (), ("b",))


def test_split_json_round_trip_checks_the_digest() -> None:
    split = random_split(random_words(50), SplitSpec(seed=2))
    stored = json.loads(json.dumps(split.to_json()))
    assert Split.from_json(stored) == split and stored["digest"] == split.digest
    stored["test"] = stored["test"][1:]
    with pytest.raises(InvalidArgument, match="does not match"):
        Split.from_json(stored)


# ---- rating examples ------------------------------------------------------------------
def test_targets_round_half_up_to_two_decimals() -> None:
    assert [rating_target(v) for v in (3.254, 3.255, 2.675, 3.0, 0.0, 5, 1 / 3, 4.999)] == [
        "3.25", "3.26", "2.68", "3.00", "0.00", "5.00", "0.33", "5.00"]


def test_rating_examples_skip_missing_ratings_and_keep_the_mean() -> None:
    norms = Norms(language="en", dataset="tiny", words=("apple", "bell", "cloud"), dimensions=("auditory", "visual"),
                  means=np.array([[0.5, 4.256], [4.9, math.nan], [math.nan, math.nan]]))
    examples = rating_examples(norms, ["Apple", "bell", "cloud"], ["visual", "auditory"], "en")
    assert [(e.key, e.dimension, e.target) for e in examples] == [
        ("apple", "visual", "4.26"), ("apple", "auditory", "0.50"), ("bell", "auditory", "4.90")]
    assert examples[0].rating == 4.256 and examples[0].language == "en" and examples[0].subtask is None
    assert examples[0].prompt == default_template("en", "visual").render("apple")
    assert [e.dimension for e in rating_examples(norms, ["apple"], ["auditory"], "en")] == ["auditory"]


def test_rating_examples_name_bad_dimensions_and_words() -> None:
    norms = synthetic_norms(10)
    with pytest.raises(InvalidArgument, match="unknown dimension 'smell'"):
        rating_examples(norms, norms.words, ["smell"], "en")
    with pytest.raises(NotFound, match="hand_arm"):
        rating_examples(norms, norms.words, ["hand_arm"], "en")
    with pytest.raises(NotFound, match="'zzzz'"):
        rating_examples(norms, ["zzzz"], ["visual"], "en")


def test_rating_data_from_a_spec_splits_by_word() -> None:
    norms = synthetic_norms(300)
    spec = TrainingSpec(base_model="m", data={"norms": "syn", "dimensions": ["visual", "haptic"],
                                              "split": {"seed": 4, "validation": 0.1, "test": 0.2}})
    data = build_training_data(spec, norms=lambda name: norms, choice_items=no_items, paper_dir=None)
    assert data.dimensions == ("visual", "haptic") and data.task == "rating" and data.language == "en"
    assert len(data.train) == 2 * 210 and len(data.validation) == 2 * 30 and len(data.test) == 2 * 60
    words = [{e.key for e in part} for part in (data.train, data.validation, data.test)]
    assert words == [set(data.split.train), set(data.split.validation), set(data.split.test)]
    assert {e.dimension for e in data.train} == {"visual", "haptic"}


def test_data_words_restrict_the_pool_the_split_draws_from() -> None:
    norms = synthetic_norms(300)
    pool = tuple(sorted(norms.words)[::3])
    spec = TrainingSpec(base_model="m", data={"norms": "syn", "words": pool, "split": {"seed": 1, "test": 0.2}})
    data = build_training_data(spec, norms=lambda name: norms, choice_items=no_items, paper_dir=None)
    everything = {*data.split.train, *data.split.validation, *data.split.test}
    assert everything == set(pool) and len(data.split.test) == 20
    whole = build_training_data(spec.model_copy(update={"data": spec.data.model_copy(update={"words": ()})}),
                                norms=lambda name: norms, choice_items=no_items, paper_dir=None)
    assert data.split.digest != whole.split.digest and spec.digest != TrainingSpec(base_model="m").digest
    with pytest.raises(InvalidArgument, match="'nope'"):
        build_training_data(TrainingSpec(base_model="m", data={"words": ("nope", *pool)}), norms=lambda name: norms,
                            choice_items=no_items, paper_dir=None)
    with pytest.raises(ValueError, match="data.words"):
        TrainingSpec(base_model="m", data={"words": pool, "split": {"kind": "wu2026"}})


def test_rating_data_refuses_what_it_cannot_build() -> None:
    norms = synthetic_norms(50)
    build = lambda **data: build_training_data(  # noqa: E731
        TrainingSpec(base_model="m", data=data), norms=lambda name: norms, choice_items=no_items, paper_dir=None)
    with pytest.raises(InvalidArgument, match="unknown dimension"):
        build(dimensions=["sight"])
    with pytest.raises(NotFound, match="torso"):
        build(dimensions=["torso"])
    with pytest.raises(InvalidArgument, match="data.language"):
        build(language="nl")
    with pytest.raises(FailedPrecondition, match="paper_dir"):
        build(split={"kind": "wu2026"})
    unrated = Norms(language="en", dataset="empty", words=("a", "b"), dimensions=("visual",),
                    means=np.full((2, 1), math.nan))
    with pytest.raises(InvalidArgument, match="no data left after filtering"):
        build_training_data(TrainingSpec(base_model="m"), norms=lambda name: unrated, choice_items=no_items,
                            paper_dir=None)


# ---- multiple choice ------------------------------------------------------------------
def item(index: Any, answer: str = "B", **changes: Any) -> dict[str, Any]:
    return {"index": index, "question": f"Question {index}?", "options": {k: f"option {k}" for k in "ABCD"},
            "correct_option": answer, **changes}


def write_items(path: Path, items: Any) -> Path:
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def test_choice_items_load_with_subtasks(tmp_path: Path) -> None:
    items = load_choice_items(write_items(tmp_path / "qa.json", [item(1001), item(2002, "D"), item(2003)]))
    assert [(i.id, i.subtask, i.answer) for i in items] == [("1001", "1", "B"), ("2002", "2", "D"), ("2003", "2", "B")]
    assert items[0].options == ("option A", "option B", "option C", "option D")
    numbered = load_choice_items(write_items(tmp_path / "n.json", [item(1), item("q2", subtask="colour")]))
    assert [i.subtask for i in numbered] == ["all", "colour"]


BAD_ITEMS = [
    ("missing option", [item(1001, options={"A": "x", "B": "y", "D": "z"})],
     "item 0 (index 1001): missing option(s) C"),
    ("extra option", [item(1001, options={k: k for k in "ABCDE"})], "unexpected option(s) E"),
    ("answer not an option", [item(1001, "E")], "'correct_option' 'E' is not among the options"),
    ("duplicate id", [item(1001), item(1002), item(1001)], "item 2 (index 1001): duplicate index '1001' (also item 0)"),
    ("empty question", [item(1001, question=" ")], "'question' must be a non-empty string"),
    ("missing field", [{"index": 1001, "question": "q?", "options": {}}], "missing field(s) correct_option"),
    ("unknown field", [item(1001, answer_text="x")], "unknown field(s) answer_text"),
    ("bool index", [item(True)], "'index' must be an integer"),
    ("not a list", {"items": []}, "non-empty JSON list"),
]


@pytest.mark.parametrize(("items", "needle"), [b[1:] for b in BAD_ITEMS], ids=[b[0] for b in BAD_ITEMS])
def test_bad_choice_files_are_refused_naming_file_and_item(tmp_path: Path, items: Any, needle: str) -> None:
    path = write_items(tmp_path / "bad.json", items)
    with pytest.raises(InvalidArgument) as info:
        load_choice_items(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_choice_files_that_are_absent_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="nope.json"):
        load_choice_items(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="broken.json: not valid JSON"):
        load_choice_items(tmp_path / "broken.json")


def test_choice_prompt_lists_lettered_options_and_asks_for_the_letter() -> None:
    it = ChoiceItem(id="7", question="Which is sourest?", options=("lemon", "bread", "rice", "milk"), answer="A",
                    subtask="8")
    prompt = choice_prompt(it)
    assert "Which is sourest?" in prompt and "A. lemon\nB. bread\nC. rice\nD. milk" in prompt
    assert prompt.rstrip().endswith("Answer with the letter only: A, B, C or D.")
    assert choice_example(it) == choice_example(it)
    example = choice_example(it)
    assert (example.key, example.target, example.subtask, example.rating) == ("7", "A", "8", None)
    assert ANSWER_LETTERS == ("A", "B", "C", "D")


def choice_spec(**split: Any) -> TrainingSpec:
    return TrainingSpec(base_model="m", task="choice", objective="text",
                        data={"choice_items": "qa", "split": split or {"seed": 0}})


def synthetic_items(n_per: int, subtasks: int, start: int = 0) -> list[ChoiceItem]:
    return [ChoiceItem(id=str(1000 * s + start + i), question="q", options=("a", "b", "c", "d"),
                       answer=ANSWER_LETTERS[i % 4], subtask=str(s))
            for s in range(1, subtasks + 1) for i in range(n_per)]


def test_choice_data_carves_a_stratified_seeded_validation_share() -> None:
    train, test = synthetic_items(60, 3), synthetic_items(40, 3, start=500)
    load = lambda name: (train, test)  # noqa: E731
    data = build_training_data(choice_spec(seed=5, validation=0.1), norms=no_items, choice_items=load, paper_dir=None)
    assert (len(data.train), len(data.validation), len(data.test)) == (162, 18, 120)
    assert Counter(e.subtask for e in data.validation) == {"1": 6, "2": 6, "3": 6}
    assert data.split.name == "given" and data.dimensions == () and not set(data.split.train) & set(data.split.test)
    again = build_training_data(choice_spec(seed=5, validation=0.1), norms=no_items, choice_items=load, paper_dir=None)
    other = build_training_data(choice_spec(seed=6, validation=0.1), norms=no_items, choice_items=load, paper_dir=None)
    assert again.split == data.split and other.split.validation != data.split.validation
    small = build_training_data(choice_spec(seed=5, max_train_words=20), norms=no_items, choice_items=load,
                                paper_dir=None)
    assert len(small.train) == 20


def test_choice_data_refuses_leaks_and_word_splits() -> None:
    train = synthetic_items(10, 1)
    with pytest.raises(InvalidArgument, match="in both the training and the test file"):
        build_training_data(choice_spec(), norms=no_items, choice_items=lambda n: (train, train[:2]), paper_dir=None)
    with pytest.raises(InvalidArgument, match="splits words"):
        build_training_data(choice_spec(kind="wu2026"), norms=no_items, choice_items=lambda n: (train, train),
                            paper_dir=None)


def test_perceptualqa_split_counts_and_subtasks() -> None:
    folder = need_shared(PAPER / "perceptualqa")
    train, test = load_choice_items(folder / "train_60.json"), load_choice_items(folder / "test_40.json")
    assert (len(train), len(test)) == (840, 560)
    per = {str(s): 120 if s <= 5 else 60 for s in range(1, 10)}
    assert Counter(i.subtask for i in train) == per
    assert Counter(i.subtask for i in test) == {k: v * 2 // 3 for k, v in per.items()}
    data = build_training_data(choice_spec(seed=0, validation=0.1), norms=no_items,
                               choice_items=lambda n: (train, test), paper_dir=None)
    assert (len(data.train), len(data.validation), len(data.test)) == (756, 84, 560)


# ---- the wu2026 split -------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper() -> Path:
    return need_shared(PAPER / "model-ratings" / "En_all_models_results.csv").parents[1]


def test_wu2026_concepts_and_norms(paper: Path) -> None:
    concepts = wu2026_concepts(paper)
    assert len(concepts.test) == 1572
    assert len({c.english for c in concepts.test}) == len({c.dutch for c in concepts.test}) == 1572
    assert concepts.english.dimensions == ("auditory", "gustatory", "haptic", "interoceptive", "olfactory", "visual",
                                           "foot_leg", "hand_arm", "head", "mouth", "torso")
    assert concepts.dutch.dimensions == SENSORY and concepts.dutch.language == "nl"
    test_en, test_nl = {c.english for c in concepts.test}, {c.dutch for c in concepts.test}
    assert not any(c.english in test_en or c.dutch in test_nl for c in concepts.other)


def test_wu2026_test_ratings_are_the_released_ones(paper: Path) -> None:
    concepts = wu2026_concepts(paper)
    with open(paper / "model-ratings" / "En_all_models_results.csv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    for row in rows[::400]:
        en = concepts.english.select([row["Word"]]).means[0]
        assert en[concepts.english.dimensions.index("visual")] == float(row["Visual.mean"])
        assert en[concepts.english.dimensions.index("foot_leg")] == float(row["Foot.mean"])
        assert en[concepts.english.dimensions.index("hand_arm")] == float(row["Hand.mean"])
        assert en[concepts.english.dimensions.index("torso")] == float(row["Torso.mean"])
        nl = concepts.dutch.select([row["Woord"]])
        assert nl.means[0][SENSORY.index("visual")] == float(row["Zien"])
        assert nl.means[0][SENSORY.index("interoceptive")] == float(row["Sensaties"])
        assert nl.gloss == (row["Word"].lower(),)


def test_wu2026_split_counts_and_disjointness(paper: Path) -> None:
    spec = SplitSpec(kind="wu2026", seed=0, validation=0.1)
    for language in ("en", "nl"):
        split, norms = wu2026_split(paper, spec, language)
        assert (len(split.train), len(split.validation), len(split.test)) == (2358, 236, 1572)
        parts = [set(split.train), set(split.validation), set(split.test)]
        assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])
        assert set(norms.words) == set().union(*parts) and norms.language == language


def test_wu2026_languages_share_concepts_and_seeds_decide(paper: Path) -> None:
    concepts = wu2026_concepts(paper)
    spec = SplitSpec(kind="wu2026", seed=0)
    train, validation = wu2026_concept_split(concepts, spec)
    for c in (*train, *validation):  # no English or Dutch word of training meets a test concept
        assert c not in concepts.test
    assert len({c.english for c in train}) == len({c.dutch for c in train}) == 2358
    en, _ = wu2026_split(paper, spec, "en")
    nl, _ = wu2026_split(paper, spec, "nl")
    assert set(en.train) == {c.english for c in train} and set(nl.train) == {c.dutch for c in train}
    assert set(nl.test) == {c.dutch for c in concepts.test} and set(en.test) == {c.english for c in concepts.test}
    assert wu2026_split(paper, spec, "en")[0] == en
    other, _ = wu2026_split(paper, SplitSpec(kind="wu2026", seed=1), "en")
    assert other.train != en.train and other.test == en.test and other.digest != en.digest
    # Training does not move when the validation share does, and subsampling stays inside it.
    assert wu2026_split(paper, SplitSpec(kind="wu2026", seed=0, validation=0.0), "en")[0].train == en.train
    small, _ = wu2026_split(paper, SplitSpec(kind="wu2026", seed=0, max_train_words=100), "en")
    assert len(small.train) == 100 and set(small.train) <= set(en.train) and small.validation == en.validation


def test_wu2026_training_data(paper: Path) -> None:
    spec = TrainingSpec(base_model="m", data={"language": "nl", "dimensions": ["visual", "olfactory"],
                                              "split": {"kind": "wu2026", "seed": 0}})
    data = build_training_data(spec, norms=no_items, choice_items=no_items, paper_dir=paper)
    assert (len(data.train), len(data.validation), len(data.test)) == (2 * 2358, 2 * 236, 2 * 1572)
    assert data.language == "nl" and all(e.language == "nl" for e in data.test[:10])
    with pytest.raises(NotFound, match="head"):
        build_training_data(spec.model_copy(update={"data": spec.data.model_copy(update={"dimensions": ("head",)})}),
                            norms=no_items, choice_items=no_items, paper_dir=paper)
