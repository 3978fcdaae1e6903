"""RSA of two 10,000-word x 576-feature activation matrices: time and peak memory.

Each method runs in a fresh process (peak RSS from ``getrusage``), on the same seeded data,
with correlation distance (the one all three offer) and Spearman comparison:
- scipy: ``pdist`` + ``spearmanr`` (tie-averaged ranks);
- rsatoolbox: ``calc_rdm(method="correlation")`` + ``compare(method="spearman")``, when installed
  (``make bench-env`` puts it in .venv-bench only);
- sensorium: ``run_rsa`` (blocked BLAS RDMs, streamed tie-averaged ranks).
Run: .venv-bench/bin/python bench/bench_rsa_large.py [--words 10000] [--features 576]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
method, n, f = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
a = rng.normal(size=(n, f)).astype(np.float32)
b = (a @ rng.normal(scale=0.1, size=(f, f)).astype(np.float32) + rng.normal(size=(n, f)).astype(np.float32))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if method == "scipy":
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr
    rho = spearmanr(pdist(a, "correlation"), pdist(b, "correlation")).statistic
elif method == "rsatoolbox":
    import rsatoolbox
    rdms = [rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(x), method="correlation") for x in (a, b)]
    rho = float(rsatoolbox.rdm.compare(rdms[0], rdms[1], method="spearman")[0, 0])
else:
    from sensorium.representations import Limits, Representations
    from sensorium.rsa import RsaOptions, run_rsa
    reps = Representations(words=tuple(map(str, range(n))), feature_names=tuple(map(str, range(f))),
                           human=a.astype(np.float64), models={{"b": b.astype(np.float64)}})
    rho = run_rsa(reps, options=RsaOptions(distance="correlation", zscore=False),
                  limits=Limits(max_words=n)).results[0].rsa
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "peak_mib": peak / 1024, "data_mib": base / 1024, "rsa": rho}}))
"""


def run(method: str, n: int, f: int) -> dict | None:
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), method, str(n), str(f)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{method}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, default=10_000)
    ap.add_argument("--features", type=int, default=576)
    ap.add_argument("--methods", default="sensorium,scipy,rsatoolbox")
    args = ap.parse_args()
    print(f"RSA, {args.words} words x {args.features} features, correlation distance, Spearman")
    results = {}
    for method in args.methods.split(","):
        if method == "rsatoolbox":
            try:
                import rsatoolbox  # noqa: F401
            except ImportError:
                print("rsatoolbox: not installed here (make bench-env); skipped")
                continue
        r = run(method, args.words, args.features)
        if r:
            results[method] = r
            print(f"{method:>10}: {r['seconds']:7.1f} s, peak {r['peak_mib']:6.0f} MiB "
                  f"(data alone {r['data_mib']:.0f} MiB), rsa {r['rsa']:.6f}")
    if "sensorium" in results:
        ours = results["sensorium"]
        for other in ("scipy", "rsatoolbox"):
            if other in results:
                print(f"sensorium vs {other}: {results[other]['seconds'] / ours['seconds']:.1f}x faster, "
                      f"{results[other]['peak_mib'] / ours['peak_mib']:.1f}x less peak memory, "
                      f"|delta rsa| {abs(results[other]['rsa'] - ours['rsa']):.1e}")


if __name__ == "__main__":
    main()
