"""The ``sensorium`` command: analyses in-process or on a running analyzer (``--server``), and
ratings and activations from a running extractor.

Its flags are a contract other tools script against: the JSON printed by ``--json`` keeps its keys.
Every failure is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from sensorium.errors import InvalidArgument, SensoriumError, validated


def _cols(text: str) -> list[str]:
    cols = [c.strip() for c in text.split(",") if c.strip()]
    if not cols:
        raise argparse.ArgumentTypeError("expected a comma-separated list of columns")
    return cols


def _clean(obj: Any) -> Any:
    """JSON has no NaN: undefined statistics are printed as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


class _ProgressBar:
    """Bootstrap progress on stderr when a person is watching; silent in pipelines."""

    def __init__(self) -> None:
        self.shown = False
        self.tty = sys.stderr.isatty()

    def update(self, label: str, done: int, total: int) -> None:
        if self.tty:
            filled = 30 * done // max(total, 1)
            sys.stderr.write(f"\r{label[:40]:<40} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
            sys.stderr.flush()
            self.shown = True

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()


def _representations(args: argparse.Namespace, models: dict[str, list[str]]):
    from sensorium.representations import Representations
    from sensorium.tables import read_table

    table = read_table(args.table, args.word_column)
    return Representations.from_table(table, args.human, models)


def _client(args: argparse.Namespace):
    from sensorium.client import AnalyzerClient

    return AnalyzerClient(args.server, token=args.token, tls_ca_file=args.tls_ca)


def _models(args: argparse.Namespace) -> dict[str, list[str]]:
    models = {"model": args.model}
    if getattr(args, "model_b", None):
        models["model_b"] = args.model_b
    return models


def cmd_rsa(args: argparse.Namespace) -> dict:
    from sensorium.rsa import RsaOptions, run_rsa

    reps = _representations(args, _models(args))
    options = validated(RsaOptions, distance=args.distance, comparison=args.compare, zscore=not args.no_zscore,
                         n_bootstrap=args.bootstrap, seed=args.seed, bootstrap_mode=args.bootstrap_mode,
                         n_permutations=args.permutations)
    if args.server:
        report = _client(args).rsa(reps, options=options)
    else:
        with _ProgressBar() as bar:
            report = run_rsa(reps, options=options, progress=bar.update)
    r = report.results[0]
    out = {"rsa": r.rsa, "n_words": r.n_words, "n_dropped": r.n_dropped, "features": r.features,
           "method": report.method}
    if r.ci is not None:
        out.update(ci_low=r.ci.low, ci_high=r.ci.high, n_bootstrap=report.n_bootstrap, seed=report.seed)
    if r.p_value is not None:
        out.update(p_value=r.p_value, n_permutations=report.n_permutations)
    return out


def cmd_dims(args: argparse.Namespace) -> dict:
    from sensorium.stats import compare_dimensions

    reps = _representations(args, _models(args))
    pairs = [("model", "model_b")] if args.model_b else []
    report = (_client(args).dimensions(reps, pairs) if args.server else compare_dimensions(reps, pairs))
    human = {f: h for f, h in zip(reps.feature_names, args.human)}
    out: dict[str, Any] = {"spearman": {}, "pearson": {}, "n_words": {}}
    for c in report.correlations:
        suffix = "" if c.model == "model" else "_b"
        out.setdefault(f"spearman{suffix}", {})[human[c.feature]] = c.spearman
        out.setdefault(f"pearson{suffix}", {})[human[c.feature]] = c.pearson
        if not suffix:
            out["n_words"][human[c.feature]] = c.n_words
    for t in report.steiger:
        if t.method == "spearman":
            out.setdefault("z", {})[human[t.feature]] = t.z
            out.setdefault("p", {})[human[t.feature]] = t.p_value
    return out


def cmd_words(args: argparse.Namespace) -> dict:
    from sensorium.stats import compare_words

    reps = _representations(args, _models(args))
    pairs = [("model", "model_b")] if args.model_b else []
    report = _client(args).words(reps, pairs) if args.server else compare_words(reps, pairs)
    sims = {s.model: s for s in report.similarities}
    out: dict[str, Any] = {"mean_similarity": sims["model"].mean, "sd": sims["model"].sd,
                           "n_words": sims["model"].n_words}
    if args.model_b:
        c = report.comparisons[0]
        out.update(mean_similarity_b=sims["model_b"].mean, sd_b=sims["model_b"].sd,
                   mean_difference=c.mean_difference, t=c.t, df=c.df, p=c.p_value,
                   ranking_spearman=c.ranking_spearman, ranking_p=c.ranking_p_value, n_words_paired=c.n_words)
    return out


# ---- the extractor -------------------------------------------------------------------------------

DEFAULT_EXTRACTOR = "127.0.0.1:50052"


def _extractor(args: argparse.Namespace):
    from sensorium.client import ExtractorClient

    return ExtractorClient(args.server, token=args.token, tls_ca_file=args.tls_ca)


def _words(args: argparse.Namespace) -> list[str]:
    """Words from the command line, then from ``--words-file`` (one per line, ``#`` comments)."""
    words = list(args.words)
    if args.words_file:
        try:
            lines = Path(args.words_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"cannot read {args.words_file}: {exc}") from exc
        words += [w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#")]
    if not words:
        raise InvalidArgument("no words: give them as arguments or with --words-file")
    return words


def cmd_models(args: argparse.Namespace) -> dict:
    with _extractor(args) as client:
        return {"models": [{"name": m.name, "kind": m.kind, "loaded": m.loaded, "digest": m.digest,
                            "n_layers": m.n_layers, "hidden_size": m.hidden_size, "device": m.device,
                            "dtype": m.dtype} for m in client.list_models()]}


def cmd_adapters(args: argparse.Namespace) -> dict:
    with _extractor(args) as client:
        if args.load or args.unload:
            info = (client.load_adapter if args.load else client.unload_adapter)(args.model, args.load or args.unload)
            found = [info]
        else:
            found = client.list_adapters(args.model)
    return {"adapters": [{"id": a.id, "base_model": a.base_model, "digest": a.digest, "created": a.created,
                          "loaded": a.loaded, "training": json.loads(a.training_json or "{}")} for a in found]}


def cmd_rate(args: argparse.Namespace) -> dict:
    """Ratings as a wide CSV (one row per word) that ``sensorium analyze`` reads directly."""
    words = _words(args)
    with _extractor(args) as client:
        reply = client.rate(args.model, words, args.dimensions, language=args.language,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, adapter=args.adapter)
    dims = [t.dimension for t in reply.templates]
    rows: dict[str, dict[str, Any]] = {w: {} for w in words}
    for r in reply.ratings:
        row = rows[r.word]
        row[r.dimension], row[f"{r.dimension}_mass"] = r.expected, r.mass
        if args.max_new_tokens:
            row[f"{r.dimension}_answer"] = r.answer
            row[f"{r.dimension}_parsed"] = r.parsed if r.HasField("parsed") else None
    columns = [c for d in dims for c in ([d, f"{d}_mass"] + ([f"{d}_answer", f"{d}_parsed"]
                                                             if args.max_new_tokens else []))]
    out: dict[str, Any] = {"model": reply.model, "model_digest": reply.model_digest, "adapter": reply.adapter,
                           "adapter_digest": reply.adapter_digest, "language": reply.language, "dimensions": dims,
                           "n_words": len(words)}
    if args.max_new_tokens:
        parsed = sum(r.HasField("parsed") for r in reply.ratings)
        out["parse_rate"] = parsed / len(reply.ratings) if reply.ratings else None
    if args.out:
        _write_csv(Path(args.out), ["word", *columns], [[w, *(rows[w].get(c) for c in columns)] for w in words])
        out["out"] = args.out
    else:
        out["ratings"] = [{"word": w, **rows[w]} for w in words]
    return out


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    import csv
    import io

    from sensorium.storage import atomic_write_bytes

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else (f"{v:.10g}" if isinstance(v, float) else v) for v in row]
                      for row in rows])
    atomic_write_bytes(path, text.getvalue().encode())


def cmd_activations(args: argparse.Namespace) -> dict:
    """Pooled hidden states into one ``.npz``: ``words`` and ``layer_<k>`` matrices."""
    import io

    import numpy as np

    from sensorium.storage import atomic_write_bytes

    words = _words(args)
    template = (args.language, args.template) if args.template else None
    with _extractor(args) as client:
        got = client.extract(args.model, words, layers=args.layers, relative_depths=args.depths,
                             pooling=args.pooling, template=template, batch_size=args.batch_size,
                             adapter=args.adapter)
    buffer = io.BytesIO()
    np.savez(buffer, words=np.array(words), **{f"layer_{k}": m for k, m in got.layers.items()})
    atomic_write_bytes(Path(args.out), buffer.getvalue())
    return {"out": args.out, "n_words": len(words), "layers": sorted(got.layers),
            "hidden_size": next(iter(got.layers.values())).shape[1], "from_cache": got.from_cache,
            "model_digest": got.model_digest, "adapter_digest": got.adapter_digest,
            "template_digest": got.template_digest}


def cmd_nearest(args: argparse.Namespace) -> dict:
    template = (args.language, args.template) if args.template else None
    with _extractor(args) as client:
        found = client.nearest(args.model, args.layer, args.word, k=args.k, pooling=args.pooling,
                               template=template, adapter=args.adapter)
    return {"neighbours": [{"word": w, "cosine": c} for w, c in found]}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in _cols(text)]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in _cols(text)]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated numbers") from None


def _extract_parser(sub: argparse._SubParsersAction) -> None:
    extract = sub.add_parser("extract", help="ratings and activations from a running extractor")
    kinds = extract.add_subparsers(dest="what", required=True)

    def common(p: argparse.ArgumentParser, *, words: bool = False, model: bool = True) -> None:
        p.add_argument("--server", default=DEFAULT_EXTRACTOR, help=f"extractor address (default {DEFAULT_EXTRACTOR})")
        p.add_argument("--token", help="bearer token")
        p.add_argument("--tls-ca", help="CA bundle to reach the server over TLS")
        if model:
            p.add_argument("--model", default="smollm2-135m-instruct", help="model name (default: the embedded one)")
            p.add_argument("--adapter", default="", help="adapter id; default: the base model")
        if words:
            p.add_argument("words", nargs="*", help="words (or --words-file)")
            p.add_argument("--words-file", help="a file of words, one per line")
            p.add_argument("--batch-size", type=int, default=0, help="words per forward pass (default: the server's)")

    models = kinds.add_parser("models", help="the models the extractor offers")
    common(models, model=False)
    models.set_defaults(run=cmd_models)

    adapters = kinds.add_parser("adapters", help="list adapters, or load / unload one")
    common(adapters, model=False)
    adapters.add_argument("--model", default="", help="only adapters of this model (required with --load/--unload)")
    group = adapters.add_mutually_exclusive_group()
    group.add_argument("--load", metavar="ID", help="make an adapter resident")
    group.add_argument("--unload", metavar="ID", help="free a resident adapter")
    adapters.set_defaults(run=cmd_adapters)

    rate = kinds.add_parser("rate", help="the model's 0-5 ratings of words, one CSV row per word")
    common(rate, words=True)
    rate.add_argument("--dimensions", type=_cols, default=None, help="comma-separated; default: all of the language")
    rate.add_argument("--language", default="en")
    rate.add_argument("--max-new-tokens", type=int, default=0, help="also decode and parse the greedy answer")
    rate.add_argument("--out", help="CSV to write; default: ratings in the JSON on stdout")
    rate.set_defaults(run=cmd_rate)

    acts = kinds.add_parser("activations", help="pooled hidden states of words, saved as .npz")
    common(acts, words=True)
    acts.add_argument("--layers", type=_ints, default=None, help="layer indices, negative from the end")
    acts.add_argument("--depths", type=_floats, default=None, help="relative depths in [0, 1]")
    acts.add_argument("--pooling", choices=["last", "word-mean", "mean"], default="last")
    acts.add_argument("--template", metavar="DIMENSION", help="embed each word in this dimension's rating prompt")
    acts.add_argument("--language", default="en", help="language of --template")
    acts.add_argument("--out", required=True, help=".npz file to write")
    acts.set_defaults(run=cmd_activations)

    nearest = kinds.add_parser("nearest", help="cached words closest to a word (cosine)")
    common(nearest)
    nearest.add_argument("word")
    nearest.add_argument("--layer", type=int, required=True)
    nearest.add_argument("--k", type=int, default=10)
    nearest.add_argument("--pooling", choices=["last", "word-mean", "mean"], default="last")
    nearest.add_argument("--template", metavar="DIMENSION")
    nearest.add_argument("--language", default="en")
    nearest.set_defaults(run=cmd_nearest)


# ---- the trainer ---------------------------------------------------------------------------------

DEFAULT_TRAINER = "127.0.0.1:50053"


def _trainer(args: argparse.Namespace):
    from sensorium.client import TrainerClient

    return TrainerClient(args.server, token=args.token, tls_ca_file=args.tls_ca)


def _job(job) -> dict[str, Any]:
    from sensorium.v1 import trainer_pb2 as tpb

    return {"id": job.id, "state": tpb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower(),
            "adapter_id": job.adapter_id, "step": job.step, "total_steps": job.total_steps,
            "created": job.created, "started": job.started, "finished": job.finished, "error": job.error,
            "metrics": dict(job.metrics), "attempts": job.attempts, "resumed_from_step": job.resumed_from_step}


def _spec_text(path: str) -> str:
    """A spec file in YAML or JSON, sent to the trainer as JSON (the trainer validates it)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"cannot read spec {path}: {exc}") from exc
    return json.dumps(data)


def cmd_train_submit(args: argparse.Namespace) -> dict:
    with _trainer(args) as client:
        reply = client.submit(_spec_text(args.spec), idempotency_key=args.key, adapter_id=args.adapter_id,
                              validate_only=args.validate_only)
        out: dict[str, Any] = {"train_examples": reply.train_examples, "validation_examples": reply.validation_examples,
                               "test_examples": reply.test_examples, "split_digest": reply.split_digest,
                               "total_steps": reply.total_steps}
        if args.validate_only:
            return {"valid": True, **out}
        out.update(created=reply.created, job=_job(reply.job))
        if args.wait:
            with _ProgressBar() as bar:
                def show(event) -> None:
                    if event.total_steps:
                        bar.update(f"{reply.job.id} {event.kind} loss={event.loss:.4f}", event.step, event.total_steps)

                out["job"] = _job(client.wait(reply.job.id, on_event=show))
        return out


def cmd_train_jobs(args: argparse.Namespace) -> dict:
    with _trainer(args) as client:
        if args.id:
            return {"jobs": [_job(client.job(args.id))]}
        return {"jobs": [_job(j) for j in client.jobs(limit=args.limit)]}


def cmd_train_watch(args: argparse.Namespace) -> dict:
    """Events as JSON lines while the job runs; the final job as the last line."""
    with _trainer(args) as client:
        def show(event) -> None:
            print(json.dumps(_clean({"seq": event.seq, "kind": event.kind, "step": event.step,
                                     "total_steps": event.total_steps, "loss": event.loss,
                                     "metrics": dict(event.metrics), "eta_seconds": event.eta_seconds,
                                     "message": event.message})), flush=True)

        return {"job": _job(client.wait(args.id, on_event=show))}


def cmd_train_cancel(args: argparse.Namespace) -> dict:
    with _trainer(args) as client:
        return {"job": _job(client.cancel(args.id))}


def _train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="fine-tuning jobs on a running trainer")
    kinds = train.add_subparsers(dest="what", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", default=DEFAULT_TRAINER, help=f"trainer address (default {DEFAULT_TRAINER})")
        p.add_argument("--token", help="bearer token")
        p.add_argument("--tls-ca", help="CA bundle to reach the server over TLS")

    submit = kinds.add_parser("submit", help="queue a job from a spec file (YAML or JSON)")
    common(submit)
    submit.add_argument("spec")
    submit.add_argument("--key", default="", help="idempotency key: resubmitting returns the same job")
    submit.add_argument("--adapter-id", default="", help="id of the adapter the job publishes")
    submit.add_argument("--validate-only", action="store_true", help="check the spec and report the plan only")
    submit.add_argument("--wait", action="store_true", help="follow the job to its end")
    submit.set_defaults(run=cmd_train_submit)

    jobs = kinds.add_parser("jobs", help="list jobs, newest first, or show one")
    common(jobs)
    jobs.add_argument("id", nargs="?")
    jobs.add_argument("--limit", type=int, default=100)
    jobs.set_defaults(run=cmd_train_jobs)

    watch = kinds.add_parser("watch", help="follow a job's events until it ends")
    common(watch)
    watch.add_argument("id")
    watch.set_defaults(run=cmd_train_watch)

    cancel = kinds.add_parser("cancel", help="cancel a queued or running job")
    common(cancel)
    cancel.add_argument("id")
    cancel.set_defaults(run=cmd_train_cancel)


def cmd_run(args: argparse.Namespace) -> dict | None:
    """Progress goes to stderr; the summary and the report's path end the output (JSON with --json)."""
    from sensorium.experiment import Addresses, run

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    outcome = run(args.spec, args.out, Addresses(args.analyzer or "", args.extractor or "", args.trainer or "",
                                                 args.token), say=say, state=args.state)
    if args.json:
        return {"report": str(outcome.report), "folder": str(outcome.folder), "summary": outcome.summary}
    print("\n" + "\n".join(outcome.summary) + f"\nreport: {outcome.report}", flush=True)
    return None


def _run_parser(sub) -> None:
    run = sub.add_parser("run", help="run an experiment spec end to end (starts the services when no addresses)")
    run.add_argument("spec", help="experiment YAML, e.g. experiments/demo.yaml")
    run.add_argument("--out", help="run folder (default runs/<name>)")
    run.add_argument("--state", help="local services' state folder (default <run folder>/state)")
    run.add_argument("--analyzer", help="analyzer HOST:PORT; give all three addresses or none")
    run.add_argument("--extractor", help="extractor HOST:PORT")
    run.add_argument("--trainer", help="trainer HOST:PORT")
    run.add_argument("--token", help="bearer token for the services")
    run.add_argument("--json", action="store_true", help="end with one JSON object instead of the summary")
    run.set_defaults(run=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sensorium", description="Human vs model sensorimotor representations.")
    sub = parser.add_subparsers(dest="command", required=True)
    analyze = sub.add_parser("analyze", help="statistics on a ratings table (CSV)")
    kinds = analyze.add_subparsers(dest="analysis", required=True)

    def common(p: argparse.ArgumentParser, with_b: bool) -> None:
        p.add_argument("table", help="CSV with one row per word")
        p.add_argument("--human", type=_cols, required=True, help="human columns, comma-separated")
        p.add_argument("--model", type=_cols, required=True, help="model columns, same order as --human")
        if with_b:
            p.add_argument("--model-b", type=_cols, help="a second model's columns, for the comparison")
        p.add_argument("--word-column", help="column holding the words (default: 'word' in any case, else the first)")
        p.add_argument("--json", action="store_true", help="print one JSON object (the default output)")
        p.add_argument("--server", help="analyzer address HOST:PORT; default: compute in-process")
        p.add_argument("--token", help="bearer token for --server")
        p.add_argument("--tls-ca", help="CA bundle to reach --server over TLS")

    rsa = kinds.add_parser("rsa", help="representational similarity analysis")
    common(rsa, with_b=False)
    rsa.add_argument("--distance", choices=["cosine", "correlation", "euclidean"], default="cosine")
    rsa.add_argument("--no-zscore", action="store_true", help="skip z-scoring each column")
    rsa.add_argument("--compare", choices=["spearman", "pearson", "kendall-tau-a"], default="spearman")
    rsa.add_argument("--bootstrap", type=int, default=0, metavar="N", help="bootstrap resamples for a 95%% interval")
    rsa.add_argument("--bootstrap-mode", choices=["index", "renormalize"], default="index")
    rsa.add_argument("--permutations", type=int, default=0, metavar="N", help="permutation test")
    rsa.add_argument("--seed", type=int, default=0)
    rsa.set_defaults(run=cmd_rsa)
    dims = kinds.add_parser("dims", help="per-dimension correlations and Steiger's test")
    common(dims, with_b=True)
    dims.set_defaults(run=cmd_dims)
    words = kinds.add_parser("words", help="word-wise similarity, paired t-test and ranking correlation")
    common(words, with_b=True)
    words.set_defaults(run=cmd_words)
    _extract_parser(sub)
    _train_parser(sub)
    _run_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except SensoriumError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # grpc.RpcError and friends: one line, no traceback
        code = getattr(exc, "code", None)
        details = getattr(exc, "details", None)
        if callable(code) and callable(details):
            print(f"error: {code().name}: {details()}", file=sys.stderr)
            return 2
        raise
    if result is not None:
        print(json.dumps(_clean(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
