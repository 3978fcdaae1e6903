"""Bootstrap of a paired RSA difference: 1,572 words x 11 dimensions, 200 resamples.

Three ways, measured in one run:
- naive: the paper notebook's recompute per resample (z-score, pdist, spearmanr for the human
  RDM and both models), the baseline;
- brute force: the index definition (RDMs computed once, resample i indexes RDM[b][:, b]) with
  pdist + spearmanr per resample: the reference the fast path must equal;
- sensorium: ``IndexBootstrap`` (one sort up front, a weighted histogram per resample).
Uses the paper's released ratings (base vs En_FT) when ../shared is present, else seeded data.
Run: .venv/bin/python bench/bench_rsa_bootstrap.py [--resamples 200] [--naive-resamples 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from sensorium.rsa.inference import IndexBootstrap, representation_rdm, resample_indices
from sensorium.rsa.rdm import square

PAPER = Path(__file__).resolve().parents[2] / "shared/data/paper-wu2026/model-ratings/En_all_models_results.csv"


def load() -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    if PAPER.exists():
        from sensorium.tables import read_table

        t = read_table(PAPER)
        dims = ["auditory", "gustatory", "haptic", "interoceptive", "olfactory", "visual",
                "foot", "hand", "head", "mouth", "torso"]
        human = t.matrix([f"{d}.mean" for d in dims])
        a = t.matrix([f"{d}_base" for d in dims])
        b = t.matrix([f"{d}_en_ft" for d in dims])
        ok = np.isfinite(human).all(1) & np.isfinite(a).all(1) & np.isfinite(b).all(1)
        return "paper ratings (base vs En_FT)", human[ok], a[ok], b[ok]
    rng = np.random.default_rng(0)
    human = rng.uniform(0, 5, size=(1572, 11))
    return ("seeded synthetic ratings", human, np.round(human + rng.normal(size=human.shape)),
            np.round(rng.uniform(0, 5, size=human.shape)))


def z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / x.std(0)


def cosine(x: np.ndarray) -> np.ndarray:
    d = pdist(x, "cosine")
    d[np.isnan(d)] = 2.0
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--naive-resamples", type=int, default=20,
                    help="resamples timed for the two slow baselines (their time is per resample)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the fast path; the median is reported")
    args = ap.parse_args()
    source, human, a, b = load()
    n = len(human)
    idx = resample_indices(n, args.resamples, seed=0)
    print(f"data: {source}, {n} words x {human.shape[1]} dims, {args.resamples} resamples")

    t0 = time.perf_counter()
    for r in idx[: args.naive_resamples]:
        dh = cosine(z(human[r]))
        spearmanr(dh, cosine(z(a[r])))[0] - spearmanr(dh, cosine(z(b[r])))[0]
    naive = (time.perf_counter() - t0) / args.naive_resamples * args.resamples

    reps = [representation_rdm(x, "cosine", True) for x in (human, a, b)]
    squares = [square(*rep) for rep in reps]
    iu = np.triu_indices(n, 1)
    t0 = time.perf_counter()
    brute = []
    for r in idx[: args.naive_resamples]:
        dh, da, db = (s[np.ix_(r, r)][iu] for s in squares)
        brute.append(spearmanr(dh, da)[0] - spearmanr(dh, db)[0])
    brute_time = (time.perf_counter() - t0) / args.naive_resamples * args.resamples

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        boot = IndexBootstrap(n, reps[0], reps[1:], "spearman")
        samples = boot.run(idx)
        times.append(time.perf_counter() - t0)
    fast = float(np.median(times))
    diff = samples[:, 0] - samples[:, 1]
    err = float(np.max(np.abs(diff[: args.naive_resamples] - np.array(brute))))
    lo, hi = np.percentile(diff, [2.5, 97.5])

    print(f"naive recompute (paper notebook): {naive:8.1f} s  (extrapolated from {args.naive_resamples})")
    print(f"brute force, index definition:    {brute_time:8.1f} s  (extrapolated from {args.naive_resamples})")
    print(f"sensorium IndexBootstrap:         {fast:8.1f} s  (setup included; median of {args.repeats}: "
          f"{', '.join(f'{t:.1f}' for t in times)})")
    print(f"speed-up vs naive: {naive / fast:.1f}x; vs brute force: {brute_time / fast:.1f}x")
    print(f"max |sensorium - brute force| over {args.naive_resamples} resamples: {err:.2e}")
    print(f"95% interval of rsa(base) - rsa(En_FT): [{lo:.3f}, {hi:.3f}]")


if __name__ == "__main__":
    main()
