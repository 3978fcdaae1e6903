"""Layer-wise RSA of a 30-layer model (31 hidden states x 576 units, SmolLM2's shape): time and peak memory.

Sensorium: ``sensorium.rsa.layers.layer_rsa`` with the layers streamed one at a time, three
dimension sets (all, sensory, motor), cosine distance on z-scored features, Spearman.
Naive baseline, same run: for every layer and dimension set, scipy ``pdist`` of the z-scored
activations and of the human ratings and ``scipy.stats.spearmanr`` of the two: the way one writes
it from the textbook, with every layer's activations held in memory first.
Each configuration runs in its own process so that its peak resident memory is its own.
Run: .venv/bin/python bench/bench_layer_rsa.py [--words 1000 5000] [--naive-layers 31 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

LAYERS, WIDTH, FEATURES = 31, 576, 11
SETS = {"all": list(range(11)), "sensory": [0, 1, 2, 3, 4, 5], "motor": [6, 7, 8, 9, 10]}


def synthetic(n: int, layer: int) -> np.ndarray:
    """A layer's activations, generated on demand (float32, as the extractor serves them)."""
    rng = np.random.default_rng([n, layer])
    return rng.standard_normal((n, WIDTH), dtype=np.float32)


def human(n: int) -> np.ndarray:
    return np.random.default_rng(n).uniform(0, 5, size=(n, FEATURES))


def run_sensorium(n: int) -> dict[str, float]:
    from sensorium.norms import DIMENSIONS
    from sensorium.representations import Representations
    from sensorium.rsa import DimensionSet
    from sensorium.rsa.layers import layer_rsa

    reps = Representations(tuple(f"w{i}" for i in range(n)), tuple(DIMENSIONS), human(n))
    sets = [DimensionSet(name=k, features=[DIMENSIONS[c] for c in v]) for k, v in SETS.items()]
    t0 = time.perf_counter()
    report = layer_rsa(reps, {"model": ((k, synthetic(n, k)) for k in range(LAYERS))}, dimension_sets=sets)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "layers": len(report.layers), "first": report.points[0].rsa}


def run_naive(n: int, layers: int) -> dict[str, float]:
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr, zscore

    t0 = time.perf_counter()
    acts = [synthetic(n, k) for k in range(layers)]
    h = human(n)
    first = None
    for x in acts:
        for cols in SETS.values():
            rho = spearmanr(pdist(zscore(h[:, cols], axis=0), "cosine"),
                            pdist(zscore(x.astype(np.float64), axis=0), "cosine")).statistic
            first = rho if first is None else first
    return {"seconds": time.perf_counter() - t0, "layers": layers, "first": float(first)}


def child(which: str, n: int, layers: int) -> None:
    out = run_sensorium(n) if which == "sensorium" else run_naive(n, layers)
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--naive-layers", type=int, nargs="+", default=[31, 4],
                    help="layers the naive baseline runs at each size (its time is scaled to 31 layers)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    print(f"{LAYERS} layers x {WIDTH} units, {FEATURES} human dimensions in {len(SETS)} sets, cosine, Spearman")
    print(f"{'words':>6s} {'run':10s} {'seconds':>9s} {'per layer':>10s} {'peak MiB':>9s} {'ratio':>7s}")
    for n, naive_layers in zip(args.words, args.naive_layers, strict=True):
        results = {}
        for which, layers in (("naive", naive_layers), ("sensorium", LAYERS)):
            line = subprocess.run([sys.executable, __file__, "--child", which, str(n), str(layers)],
                                  check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[which] = json.loads(line)
        per_layer = {k: v["seconds"] / v["layers"] for k, v in results.items()}
        assert abs(results["naive"]["first"] - results["sensorium"]["first"]) < 1e-9, results
        for which, r in results.items():
            ratio = per_layer["naive"] / per_layer[which]
            print(f"{n:6d} {which:10s} {r['seconds']:9.1f} {per_layer[which]:10.2f} {r['peak_mib']:9.0f} "
                  f"{ratio:6.1f}x" + (f"  ({r['layers']} layers)" if which == "naive" else ""), flush=True)


if __name__ == "__main__":
    main()
