"""Re-run the statistics of Wu, Conde, Reviriego & Brysbaert (2026) on their released ratings.

What ``make demo`` runs: starts the analyzer service exactly as a container does
(``python -m services.analyzer``), registers the paper's English results table with it, and asks
over gRPC for the study's RSA grid (4 models x all / sensory / motor, bootstrap differences
against the base model), the per-dimension Steiger tests and the word-wise comparison. The
numbers land in ``runs/paper-analysis/`` as JSON and are summarised on the terminal.

Needs ``../shared/data/paper-wu2026`` (the released materials are not shipped with the project);
``--table`` points at another copy of ``En_all_models_results.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TABLE = ROOT.parent / "shared/data/paper-wu2026/model-ratings/En_all_models_results.csv"
DIMS = ["Auditory", "Gustatory", "Haptic", "Interoceptive", "Olfactory", "Visual", "Foot", "Hand", "Head",
        "Mouth", "Torso"]
MODELS = {"base": "base", "En_FT": "en_ft", "Nl_FT": "nl_ft", "QA_FT": "QA_ft"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "paper-analysis")
    args = ap.parse_args()
    if not args.table.is_file():
        print(f"error: {args.table} not found. This demo re-analyses the paper's released ratings, which are "
              "not shipped with the project: put the shared materials at ../shared, or pass --table.",
              file=sys.stderr)
        return 1

    from sensorium.client import AnalyzerClient, table_data
    from sensorium.experiment.launcher import start_service
    from sensorium.rsa import DimensionSet, RsaOptions

    args.out.mkdir(parents=True, exist_ok=True)
    analyzer = start_service("analyzer", args.out, {"SENSORIUM_ANALYZER_LOG_LEVEL": "WARNING"})
    address = analyzer.address
    try:
        print(f"analyzer serving at {address}")
        with AnalyzerClient(address) as client:
            info = client.register_table("wu2026-en", args.table.read_bytes(), replace=True)
            print(f"registered table {info.name}: {info.n_rows} words, {len(info.columns)} columns")
            human = [f"{d}.mean" for d in DIMS]
            data = table_data("wu2026-en", human, {m: [f"{d}_{s}" for d in DIMS] for m, s in MODELS.items()})
            t0 = time.perf_counter()
            print(f"RSA: 4 models x 3 dimension sets, {args.bootstrap} bootstrap resamples ...", flush=True)
            rsa = client.rsa(data, [DimensionSet(name="all"), DimensionSet(name="sensory"), DimensionSet(name="motor")],
                             [(m, "base") for m in MODELS if m != "base"],
                             RsaOptions(n_bootstrap=args.bootstrap, seed=0))
            print(f"  done in {time.perf_counter() - t0:.0f} s")
            dims = client.dimensions(data, [("En_FT", "base"), ("Nl_FT", "base"), ("QA_FT", "base")])
            words = client.words(data, [("En_FT", "base"), ("Nl_FT", "base"), ("QA_FT", "base")])
    finally:
        analyzer.stop()

    for name, report in (("rsa", rsa), ("dimensions", dims), ("words", words)):
        (args.out / f"{name}.json").write_text(report.model_dump_json(indent=1))

    print("\nRSA with the human norms (Spearman of cosine RDMs, z-scored dimensions), 95% bootstrap CI")
    print(f"{'model':<7}" + "".join(f"{s:>24}" for s in ("all", "sensory", "motor")))
    for model in MODELS:
        cells = []
        for s in ("all", "sensory", "motor"):
            r = next(r for r in rsa.results if r.model == model and r.dimension_set == s)
            cells.append(f"{r.rsa:.3f} [{r.ci.low:.3f}, {r.ci.high:.3f}]")
        print(f"{model:<7}" + "".join(f"{c:>24}" for c in cells))
    print("\nGain over base (all 11 dimensions), paired bootstrap:")
    for d in rsa.differences:
        if d.dimension_set == "all":
            verdict = "excludes 0" if d.ci.low > 0 or d.ci.high < 0 else "includes 0"
            print(f"  {d.model_a:<6} {d.difference:+.3f} [{d.ci.low:+.3f}, {d.ci.high:+.3f}] ({verdict})")
    print("\nPer-dimension Spearman (model vs human) and Steiger's z against base:")
    print(f"  {'dimension':<20}{'base':>7}{'En_FT':>7}{'z':>9}")
    for d in DIMS:
        col = f"{d}.mean"
        rho = {c.model: c.spearman for c in dims.correlations if c.feature == col}
        z = next(t.z for t in dims.steiger if t.feature == col and t.model_a == "En_FT" and t.method == "spearman")
        print(f"  {col:<20}{rho['base']:>7.3f}{rho['En_FT']:>7.3f}{z:>9.2f}")
    print("\nWord-wise similarity 1/(1+Euclidean distance):")
    for s in words.similarities:
        print(f"  {s.model:<6} mean {s.mean:.3f} (n={s.n_words})")
    for c in words.comparisons:
        print(f"  {c.model_a} vs base: t({c.df:.0f}) = {c.t:.1f}, p = {c.p_value:.1e}; "
              f"ranking Spearman {c.ranking_spearman:.3f}")
    print(f"\nresults: {args.out}/rsa.json, dimensions.json, words.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
