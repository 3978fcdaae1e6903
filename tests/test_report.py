"""The experiment report: one self-contained HTML file, CSV tables that round-trip, Ward order as scipy's."""

from __future__ import annotations

import base64
import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import pdist
from scipy.stats import zscore as scipy_zscore

from sensorium.report import (
    RATINGS_COLUMNS,
    RATINGS_CSV,
    SECTION_TITLES,
    TABLES,
    DimensionRow,
    ExperimentResults,
    LayerRow,
    ProbeRow,
    RatingsMatrix,
    RsaDifferenceRow,
    RsaRow,
    SteigerRow,
    TransferRow,
    WordRow,
    build_report,
    rdm_figure_data,
    summary_lines,
    transfer_matrices,
    ward_order,
    write_tables,
)
from sensorium.rsa.rdm import calc_rdm, zscore

PNG = b"\x89PNG\r\n\x1a\n"
MODELS = ["base", "fine-tuned", "other"]
TEST_SETS = ["held-out", "lancaster"]
DIMS = ["visual", "auditory", "haptic", "hand_arm", "mouth", "interoceptive"]
N_WORDS = 30
N_LAYERS = 5
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _f(rng: np.random.Generator, low: float = -1.0, high: float = 1.0) -> float:
    return float(rng.uniform(low, high))


def synthetic(seed: int = 0) -> ExperimentResults:
    rng = np.random.default_rng(seed)
    words = [f"word{i}" for i in range(N_WORDS)]
    rsa, diffs, dims, steiger, layers, probes, word_rows, ratings = [], [], [], [], [], [], [], []
    for t in TEST_SETS:
        for dset in ["all", "perceptual"]:
            for m in MODELS:
                v = _f(rng, 0.1, 0.5)
                rsa.append(RsaRow(model=m, test_set=t, dimension_set=dset, rsa=v, ci_low=v - 0.05,
                                  ci_high=v + 0.05, n_words=N_WORDS))
                for layer in range(N_LAYERS):
                    lv = _f(rng, 0.0, 0.5)
                    layers.append(LayerRow(model=m, test_set=t, dimension_set=dset, layer=layer, rsa=lv,
                                           ci_low=lv - 0.03, ci_high=lv + 0.03))
        diffs.append(RsaDifferenceRow(model_a="fine-tuned", model_b="base", test_set=t, dimension_set="all",
                                      difference=0.19, ci_low=0.12, ci_high=0.26, n_words=N_WORDS))
        for m in MODELS:
            for d in DIMS:
                dims.append(DimensionRow(model=m, test_set=t, dimension=d, spearman=_f(rng), pearson=_f(rng),
                                         n_words=N_WORDS))
                for layer in range(N_LAYERS):
                    probes.append(ProbeRow(model=m, test_set=t, layer=layer, dimension=d, spearman=_f(rng),
                                           r2=_f(rng, 0, 1), shuffled_spearman=_f(rng, -0.1, 0.1)))
            for w in words:
                word_rows.append(WordRow(test_set=t, word=w, model=m, similarity=_f(rng, 0, 1)))
        for d in DIMS:
            steiger.append(SteigerRow(model_a="fine-tuned", model_b="base", test_set=t, dimension=d,
                                      method="steiger1980", r_a=_f(rng), r_b=_f(rng), z=_f(rng, -3, 3),
                                      p_value=_f(rng, 0, 0.2), n_words=N_WORDS))
        human = rng.uniform(0, 5, (N_WORDS, len(DIMS)))
        models = {m: (human + rng.normal(0, 1, human.shape)).tolist() for m in MODELS}
        ratings.append(RatingsMatrix(test_set=t, words=words, dimensions=DIMS, human=human.tolist(), models=models))
    conditions = ["visual", "haptic", "mouth"]
    transfer = [TransferRow(trained_on=a, tested_on=b, model="fine-tuned", base="base", difference=_f(rng),
                            ci_low=-0.5 if a != b else 0.05, ci_high=0.5)
                for a in conditions for b in conditions if (a, b) != ("mouth", "visual")]
    return ExperimentResults(
        name="Fine-tuning <script>alert(1)</script>", created="2026-01-01T00:00:00Z",
        description="desc <script>x</script> & more", models=MODELS, rsa=rsa, rsa_differences=diffs,
        dimensions=dims, steiger=steiger, transfer=transfer, layers=layers, probes=probes, words=word_rows,
        ratings=ratings, methods=["RSA: Spearman of <b>cosine</b> RDMs", "paired bootstrap over words"])


#: rsa 1, per-dimension 1 per test set, transfer 1, RDMs 1 per test set, layers 1 + probes 1,
#: word-wise 1 per test set
EXPECTED_FIGURES = 1 + len(TEST_SETS) + 1 + len(TEST_SETS) + 2 + len(TEST_SETS)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("report")
    path = build_report(synthetic(), folder)
    return path, path.read_text(encoding="utf-8")


def test_report_is_one_self_contained_file_with_every_figure(full_report: tuple[Path, str]) -> None:
    path, text = full_report
    assert path.name == "report.html"
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # nothing else, no temp files
    images = IMG.findall(text)
    assert text.count('<img src="data:image/png;base64,') == EXPECTED_FIGURES == len(images)
    for b64 in images:
        assert base64.b64decode(b64, validate=True).startswith(PNG)
    assert "<img" not in IMG.sub("", text)  # no image refers to anything outside the file
    assert "src=\"http" not in text and "<link" not in text
    for title in SECTION_TITLES.values():
        assert f"<h2>{title}</h2>" in text


def test_report_escapes_user_text_and_marks_missing_transfer_cell(full_report: tuple[Path, str]) -> None:
    _, text = full_report
    assert "<script>" not in text
    assert "Fine-tuning &lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "desc &lt;script&gt;x&lt;/script&gt; &amp; more" in text
    assert "<b>cosine</b>" not in text and "&lt;b&gt;cosine&lt;/b&gt;" in text
    transfer = text.split(f"<h2>{SECTION_TITLES['transfer']}</h2>")[1].split("</section>")[0]
    assert "<td class=\"num\">n/a</td>" in transfer
    # the summary headline sits in the header
    assert "fine-tuned vs base, held-out, all: RSA" in text


def test_transfer_matrix_keeps_missing_cell_missing() -> None:
    [m] = transfer_matrices(synthetic().transfer)
    assert m.trained_on == ["visual", "haptic", "mouth"] and m.tested_on == ["visual", "haptic", "mouth"]
    assert np.isnan(m.difference[2, 0]) and m.label(2, 0) == "n/a"
    assert np.isfinite(np.delete(m.difference.ravel(), 6)).all()
    assert m.significant[0, 0] and not m.significant[0, 1]
    assert m.label(0, 0).endswith("*") and not m.label(0, 1).endswith("*")


def test_sections_without_data_are_left_out(tmp_path: Path) -> None:
    full = synthetic()
    only_rsa = ExperimentResults(name="only rsa", created="today", models=MODELS, rsa=full.rsa)
    text = build_report(only_rsa, tmp_path).read_text(encoding="utf-8")
    assert f"<h2>{SECTION_TITLES['rsa']}</h2>" in text
    for key in ["differences", "dimensions", "transfer", "rdms", "layers", "words", "methods"]:
        assert SECTION_TITLES[key] not in text, key
    assert len(IMG.findall(text)) == 1
    assert "RSA base" in text  # without differences the summary gives each model's RSA


def test_ward_order_is_scipys_on_the_projects_zscored_cosine_rdm() -> None:
    rng = np.random.default_rng(3)
    human = rng.uniform(0, 5, (40, 6))
    project = calc_rdm(zscore(human), "cosine")
    np.testing.assert_allclose(project, pdist(scipy_zscore(human), "cosine"), atol=1e-12)
    order = ward_order(human)
    np.testing.assert_array_equal(order, leaves_list(linkage(project, method="ward")))
    np.testing.assert_array_equal(order, leaves_list(linkage(pdist(scipy_zscore(human), "cosine"), "ward")))
    assert sorted(order.tolist()) == list(range(40))


def test_rdm_figure_uses_ward_order_and_drops_words_with_missing_ratings() -> None:
    matrix = synthetic().ratings[0]
    data = rdm_figure_data(matrix)
    assert data is not None and not data.subset and data.n_dropped == 0
    np.testing.assert_array_equal(data.order, ward_order(matrix.array()))
    assert data.words == [matrix.words[i] for i in data.order]
    assert [label for label, _ in data.panels] == ["human", *MODELS]
    human = matrix.array()[data.order]
    np.testing.assert_allclose(data.panels[0][1][np.triu_indices(N_WORDS, 1)],
                               pdist(scipy_zscore(human), "cosine"), atol=1e-12)

    holed = matrix.model_copy(deep=True)
    holed.human[4][2] = None
    holed.models["other"][7][0] = math.nan
    data = rdm_figure_data(holed)
    assert data is not None and data.n_dropped == 2 and len(data.words) == N_WORDS - 2
    assert "word4" not in data.words and "word7" not in data.words
    assert "2 words with a missing rating dropped" in data.note


def test_rdm_figure_caps_words_with_a_seeded_subset() -> None:
    rng = np.random.default_rng(5)
    n = 230
    human = rng.uniform(0, 5, (n, 4))
    matrix = RatingsMatrix(test_set="big", words=[f"w{i}" for i in range(n)], dimensions=list("abcd"),
                           human=human.tolist())
    data = rdm_figure_data(matrix)
    assert data is not None and data.subset and len(data.order) == 200 and len(set(data.order.tolist())) == 200
    subset = np.sort(data.order)
    np.testing.assert_array_equal(data.order, subset[ward_order(human[subset])])
    again = rdm_figure_data(matrix)
    assert again is not None
    np.testing.assert_array_equal(again.order, data.order)
    assert "random subset" in data.note


def _parse(value: str, annotation: object) -> object:
    if value == "":
        return None
    if annotation is int:
        return int(value)
    if annotation is str:
        return value
    return float(value)


def test_write_tables_round_trip(tmp_path: Path) -> None:
    results = synthetic()
    results.ratings[1].human[0][0] = None
    paths = write_tables(results, tmp_path)
    assert sorted(p.name for p in paths) == sorted(p.name for p in tmp_path.iterdir())  # no temp files left
    assert {p.name for p in paths} == set(TABLES) | {RATINGS_CSV, "results.json"}
    for filename, (attr, row_model) in TABLES.items():
        with open(tmp_path / filename, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == list(row_model.model_fields)
            read = [row_model(**{k: _parse(v, row_model.model_fields[k].annotation) for k, v in row.items()})
                    for row in reader]
        assert read == getattr(results, attr), filename
    with open(tmp_path / RATINGS_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == RATINGS_COLUMNS
    assert len(rows) == len(TEST_SETS) * (1 + len(MODELS)) * N_WORDS * len(DIMS)
    first_t2 = next(r for r in rows if r["test_set"] == TEST_SETS[1])
    assert first_t2["value"] == ""
    r = rows[1]
    assert float(r["value"]) == results.ratings[0].human[0][1]
    back = ExperimentResults.model_validate_json((tmp_path / "results.json").read_text())
    assert back == results


def test_json_keeps_nan_and_missing_ratings(tmp_path: Path) -> None:
    results = synthetic()
    results.dimensions[0].spearman = math.nan
    results.ratings[0].models["base"][3][1] = math.nan
    write_tables(results, tmp_path)
    back = ExperimentResults.model_validate_json((tmp_path / "results.json").read_text())
    assert math.isnan(back.dimensions[0].spearman)
    assert back.ratings[0].models["base"][3][1] is None
    assert np.isnan(back.ratings[0].array("base")[3, 1])
    assert np.isnan(results.ratings[0].array("base")[3, 1])


def test_summary_lines(tmp_path: Path) -> None:
    results = synthetic()
    lines = summary_lines(results)
    assert 1 <= len(lines) <= 5
    assert lines[0].startswith("fine-tuned vs base, held-out, all: RSA ")
    assert lines[0].endswith("difference +0.19 [0.12, 0.26], significant")
    assert any("mean per-dimension Spearman" in line for line in lines)

    results.rsa_differences[0].ci_low = -0.01
    results.rsa_differences[1].ci_low, results.rsa_differences[1].ci_high = -0.4, -0.1
    lines = summary_lines(results)
    assert lines[0].endswith("[-0.01, 0.26], not significant")
    assert lines[1].endswith("[-0.40, -0.10], significant")

    many = results.model_copy(update={"rsa_differences": results.rsa_differences * 4})
    lines = summary_lines(many, limit=5)
    assert len(lines) == 5 and lines[-1].startswith("... ") and "more lines" in lines[-1]
    assert len(summary_lines(many, limit=2)) == 2
