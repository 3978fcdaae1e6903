"""The study, run: fine-tune each condition, rate the held-out words, analyse, report.

Every step talks to the services over gRPC (``sensorium.client``), so the same run works against
local processes or a cluster. Runs are resumable: an adapter is found by its content key (the
training spec's digest) and not trained again; ratings are stored in the run folder under a key
of model, adapter and words, and read back instead of recomputed. The analyses are cheap and are
always redone from the stored ratings.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from sensorium.client import Client
from sensorium.errors import FailedPrecondition, InvalidArgument, NotFound
from sensorium.experiment.spec import ExperimentSpec
from sensorium.norms import Norms
from sensorium.representations import Representations
from sensorium.rsa import RsaOptions, RsaReport
from sensorium.rsa.analysis import DimensionSet
from sensorium.storage import atomic_write_bytes
from sensorium.training.spec import TrainingSpec

#: words per rating request: progress after each
RATE_CHUNK = 256

#: ``say(line)``: where progress goes (the CLI prints it)
Say = Callable[[str], None]


def word_pool(spec: ExperimentSpec, norms: Norms, tokenizer: Any | None = None) -> list[str]:
    """The words the study draws from, sorted; seeded, so a rerun draws the same ones."""
    p = spec.words
    rated = np.isfinite(norms.means).any(axis=1)
    words = [w for w, ok in zip(norms.words, rated.tolist(), strict=True) if ok and (not p.alphabetic or w.isalpha())]
    if p.max_tokens is not None:
        if tokenizer is None:
            raise FailedPrecondition("words.max_tokens needs the model's tokenizer on this machine")
        words = [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) <= p.max_tokens]
    words = sorted(words)
    if p.size is not None:
        if len(words) < p.size:
            raise InvalidArgument(f"words.size is {p.size} but only {len(words)} words pass the filters")
        idx = np.random.default_rng(p.seed).choice(len(words), size=p.size, replace=False)
        words = sorted(words[i] for i in idx)
    return words


@dataclass(frozen=True)
class TestWords:
    """One test set, resolved: its held-out words and the human ratings they are compared with."""

    name: str
    language: str
    words: list[str]
    dimensions: list[str]
    human: np.ndarray  # words x dimensions
    dimension_sets: tuple[DimensionSet, ...]
    dataset: str


@dataclass(frozen=True)
class Plan:
    """Everything the run will do, worked out locally before a service is called: bad input fails here."""

    spec: ExperimentSpec
    pool: list[str]
    trainings: list[TrainingSpec]
    tests: list[TestWords]


def plan_experiment(spec: ExperimentSpec, tokenizer: Any | None = None, say: Say | None = None) -> Plan:
    """The word pool, each condition's training spec and each test set's words; missing data is named here."""
    from sensorium.training.data import rating_split
    from sensorium.training.execute import DataCatalog

    catalog = DataCatalog(paper_dir=spec.paper_dir, norms_root=spec.norms_root)
    have = None
    if spec.prompts is not None and spec.prompts.path is not None:
        from sensorium.prompts.sets import load_prompt_folder

        have = load_prompt_folder(spec.prompts.path)  # a missing folder or a bad template fails now
    pool = word_pool(spec, catalog.norms(spec.norms), tokenizer)
    trainings = [spec.training_spec(i, pool) for i in range(len(spec.conditions))]
    for c, training in zip(spec.conditions, trainings, strict=True):
        if training.task == "choice":
            try:
                catalog.choice_items(training.data.choice_items)
            except NotFound as exc:
                raise NotFound(f"condition {c.name!r}: {exc} (PerceptualQA comes with paper_dir)") from None
    # each rating condition's split, once: a missing file or dimension fails now
    splits = [(t, rating_split(t, catalog.norms, spec.paper_dir)[0]) for t in trainings if t.task == "rating"]
    # English words any condition on the spec's own language trained or validated on
    trained = {w for t, split in splits if t.data.language == spec.language for w in (*split.train, *split.validation)}
    tests = []
    for t in spec.tests:
        probe = spec.test_spec(t, pool)
        if probe.data.split.kind == "wu2026" and spec.paper_dir is None:
            raise InvalidArgument(f"test set {t.name!r}: split 'wu2026' needs paper_dir (the study's released files)")
        if t.words == "all":
            norms = catalog.norms(probe.data.norms)
            dims = tuple(probe.data.dimensions) or norms.dimensions
            means = norms.subset(dims).means  # NotFound names a dimension these norms lack
            words = [w for w, ok in zip(norms.words, np.isfinite(means).any(axis=1).tolist(), strict=True) if ok]
            if t.exclude_trained and trained:
                words = _untrained(words, norms, catalog.norms(spec.norms), trained, t.name, say)
        else:
            split, norms, dims = rating_split(probe, catalog.norms, spec.paper_dir)
            words = list(split.test)
        lacking = [d for d in dims if have is not None and (probe.data.language, d) not in have]
        if lacking:
            raise NotFound(f"test set {t.name!r}: prompts {spec.prompts.path} have no {probe.data.language} "
                           f"template for {', '.join(lacking)}")
        words = sorted(words)
        if t.max_words is not None and t.max_words < len(words):
            idx = np.random.default_rng(probe.data.split.seed).choice(len(words), size=t.max_words, replace=False)
            words = sorted(words[i] for i in idx)
        if len(words) < 3:
            raise InvalidArgument(f"test set {t.name!r}: {len(words)} test words; RSA needs at least 3")
        human = norms.subset(dims).means[[norms.index[w] for w in words]]
        tests.append(TestWords(t.name, probe.data.language, words, list(dims), human, t.dimension_sets, norms.dataset))
    return Plan(spec, pool, trainings, tests)


def _untrained(words: list[str], norms: Norms, english: Norms, trained: set[str], name: str,
               say: Say | None) -> list[str]:
    """Another language's words less those whose English counterpart (by gloss, one-to-one) was trained on.

    Datasets in the spec's own language are their own counterparts; a dataset with no gloss
    cannot be checked and is kept whole, with a warning.
    """
    from sensorium.norms import align

    if norms.language == english.language:
        return [w for w in words if w not in trained]
    if norms.gloss is None:
        if say is not None:
            say(f"[words] {name}: {norms.dataset} has no English gloss; trained concepts cannot be excluded")
        return words
    paired = dict(align(norms, english, ("gloss",)).pairs)
    kept = [w for w in words if paired.get(w) not in trained]
    if say is not None:
        say(f"[words] {name}: {len(words) - len(kept)} words whose English gloss was trained on left out")
    return kept


def trained_on(training: TrainingSpec) -> str:
    """A condition as a row of the transfer matrix: what it was fine-tuned on."""
    if training.task == "choice":
        return f"{training.data.choice_items} (multiple choice)"
    dims = ", ".join(training.data.dimensions) if training.data.dimensions else "all dimensions"
    return f"{training.data.language}: {dims}"


def _key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _content(value: Any) -> Any:
    """JSON-able stand-in for a step's inputs: arrays by shape and bytes digest, models by their fields."""
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value, dtype=np.float64)
        return {"shape": list(data.shape), "sha256": hashlib.sha256(data.tobytes()).hexdigest()}
    if isinstance(value, Representations):
        return {"words": list(value.words), "features": list(value.feature_names), "human": _content(value.human),
                "models": {k: _content(v) for k, v in value.models.items()},
                "sd": None if value.human_sd is None else _content(value.human_sd),
                "n": None if value.human_n is None else _content(value.human_n)}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _content(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_content(v) for v in value]
    return value


M = TypeVar("M", bound=BaseModel)


class Run:
    """One run folder: ``steps/`` holds what was computed, keyed by content; the report goes beside it."""

    def __init__(self, spec: ExperimentSpec, folder: Path, clients: Client, say: Say = print) -> None:
        self.spec, self.folder, self.clients, self.say = spec, folder, clients, say
        (folder / "steps").mkdir(parents=True, exist_ok=True)

    # ---- fine-tuning ---------------------------------------------------------------------------
    def adapters(self, plan: Plan) -> dict[str, str]:
        """Condition name -> adapter id, training only the conditions whose adapter is not there yet."""
        from sensorium.v1 import trainer_pb2 as tpb

        have = {a.id for a in self.clients.extractor.list_adapters(self.spec.base_model)}
        out: dict[str, str] = {}
        for c, training in zip(self.spec.conditions, plan.trainings, strict=True):
            adapter = f"{self.spec.name}-{c.name}-{training.digest[:12]}"
            out[c.name] = adapter
            if adapter in have:
                self.say(f"[train] {c.name}: adapter {adapter} exists, not trained again")
                continue
            plan_reply = self.clients.trainer.submit(training.model_dump_json(), validate_only=True)
            self.say(f"[train] {c.name}: {plan_reply.train_examples} examples, {plan_reply.total_steps} steps")
            job = self.clients.trainer.submit(training.model_dump_json(), idempotency_key=training.digest,
                                              adapter_id=adapter).job
            began = time.monotonic()
            last = [0.0]

            def show(event: Any, name: str = c.name) -> None:
                now = time.monotonic()
                if event.kind == "step" and now - last[0] < 10 and event.step != event.total_steps:
                    return
                last[0] = now
                eta = f", ETA {event.eta_seconds:.0f} s" if event.eta_seconds else ""
                loss = f", loss {event.loss:.4f}" if event.kind == "step" else ""
                self.say(f"[train] {name}: {event.kind} {event.step}/{event.total_steps}{loss}{eta}")

            done = self.clients.trainer.wait(job.id, on_event=show)
            if done.state != tpb.JOB_STATE_SUCCEEDED:
                raise FailedPrecondition(f"fine-tuning {c.name!r} ended {tpb.JobState.Name(done.state)}: {done.error}")
            self.say(f"[train] {c.name}: done in {time.monotonic() - began:.0f} s")
        return out

    # ---- analyses ------------------------------------------------------------------------------
    def analysis(self, kind: str, label: str, model: type[M], compute: Callable[[], M], *inputs: Any) -> M:
        """An analyzer answer, stored under the digest of everything it was computed from.

        A stored answer that no longer parses (a damaged file) is recomputed, never trusted.
        """
        key = hashlib.sha256(json.dumps(_content([kind, *inputs]), sort_keys=True).encode()).hexdigest()[:16]
        path = self.folder / "steps" / f"{kind}-{label}-{key}.json"
        if path.is_file():
            try:
                value = model.model_validate_json(path.read_bytes())
                self.say(f"[analyze] {label}: {kind} found in {path.name}, not recomputed")
                return value
            except ValidationError:
                self.say(f"[analyze] {label}: {path.name} is damaged; recomputing")
        value = compute()
        atomic_write_bytes(path, value.model_dump_json().encode())
        return value

    # ---- ratings -------------------------------------------------------------------------------
    def ratings(self, test: TestWords, adapter: str, label: str) -> tuple[np.ndarray, float]:
        """words x dims model ratings (the spec's readout) and the parse rate; stored, read back on a rerun."""
        readout = self.spec.analyses.readout
        words, dims = test.words, test.dimensions
        # adapter ids carry their training spec's digest, so (model, adapter, words) names the content
        prompts = self.spec.prompts.name if self.spec.prompts else ""
        key = _key(self.spec.base_model, adapter, readout, test.language, prompts, *dims, *words)
        path = self.folder / "steps" / f"ratings-{test.name}-{label}-{key}.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            return np.array(stored["ratings"], dtype=np.float64), float(stored["parse_rate"])
        began = time.monotonic()
        out = np.full((len(words), len(dims)), np.nan)
        row, col = {w: i for i, w in enumerate(words)}, {d: j for j, d in enumerate(dims)}
        parsed = answered = 0
        # in chunks, so that a long test set shows its progress and a retry repeats one chunk only
        for start in range(0, len(words), RATE_CHUNK):
            chunk = words[start:start + RATE_CHUNK]
            reply = self.clients.extractor.rate(self.spec.base_model, chunk, dims, language=test.language,
                                                max_new_tokens=4 if readout == "greedy" else 0, adapter=adapter,
                                                prompts=prompts)
            for r in reply.ratings:
                value = r.expected if readout == "expected" else (r.parsed if r.HasField("parsed") else np.nan)
                parsed += readout == "greedy" and r.HasField("parsed")
                out[row[r.word], col[r.dimension]] = value
            answered += len(reply.ratings)
            if start + RATE_CHUNK < len(words):
                self.say(f"[rate] {test.name}, {label}: {start + len(chunk)}/{len(words)} words, "
                         f"{time.monotonic() - began:.0f} s")
        rate = parsed / max(1, answered) if readout == "greedy" else 1.0
        record = {"ratings": [[None if np.isnan(v) else v for v in r] for r in out], "parse_rate": rate,
                  "adapter": adapter, "words": words, "dimensions": dims, "prompts": prompts,
                  "templates": {t.dimension: t.digest for t in reply.templates},
                  "model_digest": reply.model_digest, "adapter_digest": reply.adapter_digest}
        atomic_write_bytes(path, json.dumps(record).encode())
        self.say(f"[rate] {test.name}, {label}: {len(words)} words x {len(dims)} dimensions "
                 f"in {time.monotonic() - began:.0f} s")
        return out, rate


def available_sets(test: TestWords, say: Say | None = None) -> list[DimensionSet]:
    """The test set's dimension sets its norms can answer; the others are reported as not available.

    A set that names a dimension the norms lack (a Russian dataset has no motor dimensions) is
    left out, never imputed, so its cells stay empty (n/a) in the tables and the transfer matrix.
    """
    out = []
    for s in test.dimension_sets:
        lacking = [f for f in s.features if f not in test.dimensions]
        if lacking:
            if say is not None:
                say(f"[analyze] {test.name}: {s.name} not available ({test.dataset} lacks {', '.join(lacking)})")
            continue
        out.append(s)
    return out


def _ci(ci: Any) -> tuple[float | None, float | None]:
    return (ci.low, ci.high) if ci is not None else (None, None)


def run_experiment(plan: Plan, folder: Path, clients: Client, say: Say = print):
    """The whole study; returns the results the report is built from."""
    from sensorium import report
    from sensorium.stats import DimensionsReport, WordsReport

    spec, a = plan.spec, plan.spec.analyses
    run = Run(spec, folder, clients, say)
    say(f"[words] {len(plan.pool)} words in the pool; test sets: "
        + "; ".join(f"{t.name} ({t.language}, {len(t.words)} words)" for t in plan.tests))
    adapters = run.adapters(plan)
    variants = {"base": "", **adapters}
    conditions = [c.name for c in spec.conditions]
    pairs = [(c, "base") for c in conditions]
    described = {c.name: trained_on(t) for c, t in zip(spec.conditions, plan.trainings, strict=True)}
    results = report.ExperimentResults(name=spec.name, created=datetime.now(UTC).isoformat(timespec="seconds"),
                                       description=spec.description, models=spec.models, confidence=a.confidence)
    options = RsaOptions(n_bootstrap=a.n_bootstrap, seed=a.seed, confidence=a.confidence,
                         bootstrap_mode=a.bootstrap_mode)
    parse_rates: dict[tuple[str, str], float] = {}
    reps_of: dict[str, Representations] = {}
    for test in plan.tests:
        ratings: dict[str, np.ndarray] = {}
        for name, adapter in variants.items():
            ratings[name], parse_rates[test.name, name] = run.ratings(test, adapter, name)
        reps = reps_of[test.name] = Representations(tuple(test.words), tuple(test.dimensions), test.human,
                                                    models=ratings)
        sets = available_sets(test, say)
        if sets:
            _rsa_step(run, test, reps, sets, pairs, described, options, results)
        steiger_pairs = pairs if a.steiger else []
        per_dim = run.analysis("dimensions", test.name, DimensionsReport,
                               lambda: clients.analyzer.dimensions(reps, steiger_pairs, n_bootstrap=0, seed=a.seed),
                               reps, steiger_pairs, a.seed)
        results.dimensions += [
            report.DimensionRow(model=c.model, test_set=test.name, dimension=c.feature, spearman=c.spearman,
                                pearson=c.pearson, n_words=c.n_words) for c in per_dim.correlations]
        results.steiger += [
            report.SteigerRow(model_a=x.model_a, model_b=x.model_b, test_set=test.name, dimension=x.feature,
                              method=x.method, r_a=x.r_a, r_b=x.r_b, z=x.z, p_value=x.p_value, n_words=x.n_words)
            for x in per_dim.steiger]
        results.ratings.append(report.RatingsMatrix(test_set=test.name, words=test.words, dimensions=test.dimensions,
                                                    human=_rows(test.human),
                                                    models={m: _rows(x) for m, x in ratings.items()}))
        if a.words:
            words_report = run.analysis("words", test.name, WordsReport,
                                        lambda: clients.analyzer.words(reps, pairs, include_per_word=True), reps, pairs)
            results.words += [report.WordRow(test_set=test.name, word=w, model=s.model, similarity=v)
                              for s in words_report.similarities
                              for w, v in zip(s.words, s.similarity, strict=True)]
    results.methods += [
        "Per-dimension correlations: Spearman and Pearson of model and human ratings over the held-out words; "
        "fine-tuned vs base compared with Steiger's (1980) z-test for dependent correlations sharing the human "
        "variable, two-sided.",
        f"Ratings: the {a.readout} readout" + ("" if a.readout == "expected" else " (parse rates: " + ", ".join(
            f"{t} {m} {r:.0%}" for (t, m), r in parse_rates.items()) + ")") + "."]
    if a.layers is not None:
        _layer_analyses(run, plan, reps_of, variants, pairs, results)
    return results


def _rsa_step(run: Run, test: TestWords, reps: Representations, sets: list[DimensionSet],
              pairs: list[tuple[str, str]], described: dict[str, str], options: RsaOptions, results: Any) -> None:
    """RSA of every model on one test set, its differences from the base, and its transfer-matrix cells."""
    from sensorium import report

    a = run.spec.analyses
    run.say(f"[analyze] {test.name}: RSA with {a.n_bootstrap} bootstrap resamples")
    rsa_pairs = pairs if a.n_bootstrap else []
    rsa = run.analysis("rsa", test.name, RsaReport,
                       lambda: run.clients.analyzer.rsa(reps, sets, rsa_pairs, options), reps, sets, rsa_pairs, options)
    results.rsa += [report.RsaRow(model=r.model, test_set=test.name, dimension_set=r.dimension_set, rsa=r.rsa,
                                  ci_low=_ci(r.ci)[0], ci_high=_ci(r.ci)[1], n_words=r.n_words) for r in rsa.results]
    results.rsa_differences += [
        report.RsaDifferenceRow(model_a=d.model_a, model_b=d.model_b, test_set=test.name, dimension_set=d.dimension_set,
                                difference=d.difference, ci_low=d.ci.low, ci_high=d.ci.high, n_words=d.n_words)
        for d in rsa.differences]
    results.transfer += [
        report.TransferRow(trained_on=described[d.model_a], tested_on=f"{test.name}: {d.dimension_set}",
                           model=d.model_a, base=d.model_b, difference=d.difference, ci_low=d.ci.low,
                           ci_high=d.ci.high) for d in rsa.differences]
    if rsa.method not in results.methods:
        results.methods.insert(0, rsa.method)


def _layer_analyses(run: Run, plan: Plan, reps_of: dict[str, Representations], variants: dict[str, str],
                    pairs: list[tuple[str, str]], results: Any) -> None:
    """Layer-wise RSA and probes of one test set's bare words, every model (the analyzer reads the extractor)."""
    from sensorium import report
    from sensorium.probes import ProbeOptions, ProbesReport
    from sensorium.rsa.layers import LayerRsaReport

    spec, la, clients, say = plan.spec, plan.spec.analyses.layers, run.clients, run.say
    assert la is not None
    test = next(t for t in plan.tests if t.name == (la.test_set or plan.tests[0].name))
    reps = reps_of[test.name]
    say(f"[analyze] {test.name}: layer-wise RSA ({la.pooling} pooling, {la.n_bootstrap} bootstrap resamples)")
    options = RsaOptions(n_bootstrap=la.n_bootstrap, seed=spec.analyses.seed, confidence=spec.analyses.confidence)
    sets, layer_pairs = available_sets(test), pairs if la.n_bootstrap else []
    layered = run.analysis(
        "layer-rsa", test.name, LayerRsaReport,
        lambda: clients.analyzer.layer_rsa(reps, spec.base_model, variants, layers=list(la.layers), pooling=la.pooling,
                                           dimension_sets=sets, comparisons=layer_pairs, options=options),
        reps, spec.base_model, variants, la, sets, layer_pairs, options)
    results.layers = [report.LayerRow(model=p.model, test_set=test.name, dimension_set=p.dimension_set,
                                      layer=p.layer, rsa=p.rsa, ci_low=_ci(p.ci)[0], ci_high=_ci(p.ci)[1])
                      for p in layered.points]
    results.methods.append(f"Layer-wise RSA on {test.name}: {layered.method}; activations of the bare word, "
                           f"{la.pooling}-pooled.")
    if la.probes:
        say(f"[analyze] {test.name}: ridge probes per layer and dimension ({la.probe_folds}-fold)")
        probe_options = ProbeOptions(folds=la.probe_folds, seed=spec.analyses.seed)
        probes = run.analysis(
            "probes", test.name, ProbesReport,
            lambda: clients.analyzer.layer_probes(reps, spec.base_model, variants, layers=list(la.layers),
                                                  pooling=la.pooling, options=probe_options),
            reps, spec.base_model, variants, la, probe_options)
        results.probes = [report.ProbeRow(model=p.model, test_set=test.name, layer=p.layer, dimension=p.dimension,
                                          spearman=p.spearman, r2=p.r2, shuffled_spearman=p.shuffled_spearman)
                          for p in probes.scores]
        results.methods.append(f"Probes on {test.name}: {probes.method}.")


def _rows(x: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in x]
