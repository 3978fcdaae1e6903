"""The ``sensorium`` command: the library in-process, or a running service with ``--server``.

Its flags are a contract other tools script against: the JSON printed by ``--json`` keeps its keys.
Every failure is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from sensorium.errors import SensoriumError, validated


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
    print(json.dumps(_clean(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
