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
from typing import Any

import numpy as np

from sensorium.client import AnalyzerClient, ExtractorClient, TrainerClient
from sensorium.errors import FailedPrecondition, InvalidArgument
from sensorium.experiment.spec import ExperimentSpec
from sensorium.norms import Norms
from sensorium.representations import Representations
from sensorium.rsa import RsaOptions
from sensorium.storage import atomic_write_bytes

#: ``say(line)``: where progress goes (the CLI prints it)
Say = Callable[[str], None]


@dataclass
class Clients:
    analyzer: AnalyzerClient
    extractor: ExtractorClient
    trainer: TrainerClient


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


def training_spec(spec: ExperimentSpec, condition_index: int, pool: list[str]) -> dict[str, Any]:
    c = spec.conditions[condition_index]
    training = dict(c.training)
    data = {"norms": spec.norms, "language": spec.language, "dimensions": list(c.dimensions), "words": pool,
            "split": spec.split, **training.pop("data", {})}
    return {"base_model": spec.base_model, "task": "rating", **training, "data": data}


def _key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


class Run:
    """One run folder: ``steps/`` holds what was computed, keyed by content; the report goes beside it."""

    def __init__(self, spec: ExperimentSpec, folder: Path, clients: Clients, say: Say = print) -> None:
        self.spec, self.folder, self.clients, self.say = spec, folder, clients, say
        (folder / "steps").mkdir(parents=True, exist_ok=True)

    # ---- fine-tuning ---------------------------------------------------------------------------
    def adapters(self, pool: list[str]) -> dict[str, str]:
        """Condition name -> adapter id, training only the conditions whose adapter is not there yet."""
        from sensorium.training.spec import TrainingSpec

        have = {a.id for a in self.clients.extractor.list_adapters(self.spec.base_model)}
        out: dict[str, str] = {}
        for i, c in enumerate(self.spec.conditions):
            training = TrainingSpec.model_validate(training_spec(self.spec, i, pool))
            adapter = f"{self.spec.name}-{c.name}-{training.digest[:12]}"
            out[c.name] = adapter
            if adapter in have:
                self.say(f"[train] {c.name}: adapter {adapter} exists, not trained again")
                continue
            plan = self.clients.trainer.submit(training.model_dump_json(), validate_only=True)
            self.say(f"[train] {c.name}: {plan.train_examples} examples, {plan.total_steps} steps")
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
            from sensorium.v1 import trainer_pb2 as tpb

            if done.state != tpb.JOB_STATE_SUCCEEDED:
                raise FailedPrecondition(f"fine-tuning {c.name!r} ended {tpb.JobState.Name(done.state)}: {done.error}")
            self.say(f"[train] {c.name}: done in {time.monotonic() - began:.0f} s")
        return out

    # ---- ratings -------------------------------------------------------------------------------
    def ratings(self, words: list[str], dims: list[str], adapter: str, label: str) -> tuple[np.ndarray, float]:
        """words x dims model ratings (the spec's readout) and the parse rate; stored, read back on a rerun."""
        readout = self.spec.analyses.readout
        # adapter ids carry their training spec's digest, so (model, adapter, words) names the content
        key = _key(self.spec.base_model, adapter, readout, self.spec.language, *dims, *words)
        path = self.folder / "steps" / f"ratings-{label}-{key}.json"
        if path.is_file():
            stored = json.loads(path.read_text())
            return np.array(stored["ratings"], dtype=np.float64), float(stored["parse_rate"])
        began = time.monotonic()
        reply = self.clients.extractor.rate(self.spec.base_model, words, dims, language=self.spec.language,
                                            max_new_tokens=4 if readout == "greedy" else 0, adapter=adapter)
        out = np.full((len(words), len(dims)), np.nan)
        row, col = {w: i for i, w in enumerate(words)}, {d: j for j, d in enumerate(dims)}
        parsed = 0
        for r in reply.ratings:
            value = r.expected if readout == "expected" else (r.parsed if r.HasField("parsed") else np.nan)
            parsed += readout == "greedy" and r.HasField("parsed")
            out[row[r.word], col[r.dimension]] = value
        rate = parsed / max(1, len(reply.ratings)) if readout == "greedy" else 1.0
        atomic_write_bytes(path, json.dumps({"ratings": [[None if np.isnan(v) else v for v in r] for r in out],
                                             "parse_rate": rate, "adapter": adapter, "words": words,
                                             "model_digest": reply.model_digest, "adapter_digest": reply.adapter_digest,
                                             "dimensions": dims}).encode())
        self.say(f"[rate] {label}: {len(words)} words x {len(dims)} dimensions in {time.monotonic() - began:.0f} s")
        return out, rate


def run_experiment(spec: ExperimentSpec, folder: Path, clients: Clients, say: Say = print,
                   tokenizer: Any | None = None):
    """The whole study; returns the results the report is built from."""
    from sensorium import report
    from sensorium.training.execute import DataCatalog
    from sensorium.training.spec import TrainingSpec

    run = Run(spec, folder, clients, say)
    catalog = DataCatalog()
    norms = catalog.norms(spec.norms)
    pool = word_pool(spec, norms, tokenizer)
    say(f"[words] {len(pool)} words in the pool ({norms.dataset})")
    adapters = run.adapters(pool)

    # the held-out words: the split every condition was trained with (the same pool and split spec)
    from sensorium.training.data import build_training_data

    probe = TrainingSpec.model_validate({"base_model": spec.base_model, "data": {
        "norms": spec.norms, "language": spec.language, "words": pool, "split": spec.split}})
    split = build_training_data(probe, norms=catalog.norms, choice_items=catalog.choice_items, paper_dir=None).split
    words = sorted(split.test)
    dims = list(norms.dimensions)
    human = norms.subset(dims).means[[norms.index[w] for w in words]]
    say(f"[words] {len(words)} held-out words, {len(split.train)} training words")

    variants = {"base": "", **adapters}
    ratings: dict[str, np.ndarray] = {}
    parse_rates: dict[str, float] = {}
    for name, adapter in variants.items():
        ratings[name], parse_rates[name] = run.ratings(words, dims, adapter, name)

    a = spec.analyses
    reps = Representations(tuple(words), tuple(dims), human, models=ratings)
    conditions = [c.name for c in spec.conditions]
    pairs = [(c, "base") for c in conditions]
    options = RsaOptions(n_bootstrap=a.n_bootstrap, seed=a.seed, confidence=a.confidence)
    say(f"[analyze] RSA with {a.n_bootstrap} bootstrap resamples")
    rsa = clients.analyzer.rsa(reps, list(a.dimension_sets), pairs if a.n_bootstrap else [], options)
    dims_report = clients.analyzer.dimensions(reps, pairs if a.steiger else [], n_bootstrap=0, seed=a.seed)
    words_report = clients.analyzer.words(reps, pairs, include_per_word=True) if a.words else None

    test_set = "held-out"
    results = report.ExperimentResults(
        name=spec.name, created=datetime.now(UTC).isoformat(timespec="seconds"), description=spec.description,
        models=spec.models, confidence=a.confidence,
        rsa=[report.RsaRow(model=r.model, test_set=test_set, dimension_set=r.dimension_set, rsa=r.rsa,
                           ci_low=r.ci.low if r.ci else None, ci_high=r.ci.high if r.ci else None,
                           n_words=r.n_words) for r in rsa.results],
        rsa_differences=[report.RsaDifferenceRow(model_a=d.model_a, model_b=d.model_b, test_set=test_set,
                                                 dimension_set=d.dimension_set, difference=d.difference,
                                                 ci_low=d.ci.low, ci_high=d.ci.high, n_words=d.n_words)
                         for d in rsa.differences],
        dimensions=[report.DimensionRow(model=c.model, test_set=test_set, dimension=c.feature, spearman=c.spearman,
                                        pearson=c.pearson, n_words=c.n_words) for c in dims_report.correlations],
        steiger=[report.SteigerRow(model_a=s.model_a, model_b=s.model_b, test_set=test_set, dimension=s.feature,
                                   method=s.method, r_a=s.r_a, r_b=s.r_b, z=s.z, p_value=s.p_value,
                                   n_words=s.n_words) for s in dims_report.steiger],
        transfer=[report.TransferRow(trained_on=_trained_on(spec, d.model_a), tested_on=d.dimension_set,
                                     model=d.model_a, base=d.model_b, difference=d.difference, ci_low=d.ci.low,
                                     ci_high=d.ci.high) for d in rsa.differences],
        ratings=[report.RatingsMatrix(test_set=test_set, words=words, dimensions=dims, human=_rows(human),
                                      models={m: _rows(x) for m, x in ratings.items()})],
        methods=[rsa.method,
                 "Per-dimension correlations: Spearman and Pearson of model and human ratings over the held-out "
                 "words; fine-tuned vs base compared with Steiger's (1980) z-test for dependent correlations "
                 "sharing the human variable, two-sided.",
                 f"Ratings: the {a.readout} readout" + (
                     "" if a.readout == "expected" else
                     f" (parse rates: {', '.join(f'{m} {r:.0%}' for m, r in parse_rates.items())})") + "."],
    )
    if words_report is not None:
        results.words = [report.WordRow(test_set=test_set, word=w, model=s.model, similarity=v)
                         for s in words_report.similarities for w, v in zip(s.words, s.similarity, strict=True)]
    if a.layers is not None:
        say("[analyze] layer-wise RSA")
        layer_options = RsaOptions(n_bootstrap=a.layers.n_bootstrap, seed=a.seed, confidence=a.confidence)
        layered = clients.analyzer.layer_rsa(
            Representations(tuple(words), tuple(dims), human, models=ratings), spec.base_model, variants,
            layers=list(a.layers.layers), pooling=a.layers.pooling, dimension_sets=list(a.dimension_sets),
            comparisons=pairs if a.layers.n_bootstrap else [], options=layer_options)
        results.layers = [report.LayerRow(model=p.model, test_set=test_set, dimension_set=p.dimension_set,
                                          layer=p.layer, rsa=p.rsa, ci_low=p.ci.low if p.ci else None,
                                          ci_high=p.ci.high if p.ci else None) for p in layered.points]
        results.methods.append(layered.method + f"; activations pooled by {a.layers.pooling} over the bare word")
    return results


def _trained_on(spec: ExperimentSpec, model: str) -> str:
    c = next(c for c in spec.conditions if c.name == model)
    return ", ".join(c.dimensions) if c.dimensions else "all dimensions"


def _rows(x: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in x]
