"""The vector cache: every computed activation stored once, found again by what produced it.

A vector's key is the space it lives in (model digest, adapter digest, template digest, pooling,
layer) plus the word; the device never enters the key, so a vector computed on a GPU is a hit
on a CPU. Each space is one FAISS index holding the raw float32 vectors (FAISS returns them
bit for bit); the word -> id map lives beside the index, not inside it, because FAISS is a
similarity index, not a key-value store. Nearest neighbours are by cosine.

On disk: per space an index file and a keys file, named after their own SHA-256, and a
``manifest.json`` naming the current files, written last and atomically. A crash at any point
leaves the previous manifest and every file it names intact. A load checks every checksum; a
cache that fails is moved aside and started afresh (and counted), never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from sensorium.errors import InvalidArgument, NotFound
from sensorium.storage import atomic_write_bytes, atomic_write_json, sha256_bytes

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
STORE = "vector cache"  # the store's name in errors


class Space(BaseModel):
    """Everything that changes a vector, apart from the word."""

    model_config = ConfigDict(frozen=True)

    model: str  # digest of the model's weights and config
    adapter: str = ""  # digest of the adapter, "" for the base model
    template: str = ""  # digest of the prompt template, "" for the bare word
    pooling: str
    layer: int

    @property
    def digest(self) -> str:
        text = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class _SpaceIndex:
    space: Space
    dim: int
    index: object  # faiss.IndexIDMap2 over IndexFlatIP
    ids: dict[str, int] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)  # word -> last access tick
    next_id: int = 0
    dirty: bool = True


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    corrupt_rebuilds: int = 0
    failed_flushes: int = 0


def _new_index(dim: int):
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class VectorCache:
    """Bounded, persistent, thread-safe store of word vectors per space, with cosine neighbours."""

    def __init__(self, root: Path | None, max_vectors: int = 1_000_000) -> None:
        if max_vectors < 1:
            raise InvalidArgument("the cache needs room for at least one vector")
        self.root = Path(root) if root is not None else None
        self.max_vectors = max_vectors
        self.stats = CacheStats()
        self._spaces: dict[str, _SpaceIndex] = {}
        self._tick = 0
        self._lock = threading.RLock()
        self._manifest_files: dict[str, dict] = {}
        if self.root is not None:
            self._load()

    # ---- lookups ---------------------------------------------------------------------------
    def get_many(self, space: Space, words: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
        """The cached vectors of ``words`` and the words that still have to be computed."""
        with self._lock:
            entry = self._spaces.get(space.digest)
            ids = entry.ids if entry is not None else {}
            found = [w for w in words if w in ids]
            misses = [w for w in words if w not in ids]
            hits: dict[str, np.ndarray] = {}
            if found:
                # One batched reconstruction per call: a cache hit of a whole request is tens of
                # thousands of vectors, and one FAISS call per vector cost more than the stream.
                rows = entry.index.reconstruct_batch(np.fromiter((ids[w] for w in found), np.int64, len(found)))
                hits = dict(zip(found, rows))
                entry.used.update(zip(found, range(self._tick + 1, self._tick + 1 + len(found))))
                self._tick += len(found)
            self.stats.hits += len(hits)
            self.stats.misses += len(misses)
            return hits, misses

    def put_many(self, space: Space, words: list[str], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(words):
            raise InvalidArgument(f"{len(words)} words but vectors of shape {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise InvalidArgument("refusing to cache non-finite vectors")
        with self._lock:
            entry = self._spaces.get(space.digest)
            if entry is None:
                entry = self._spaces[space.digest] = _SpaceIndex(space, vectors.shape[1], _new_index(vectors.shape[1]))
            if vectors.shape[1] != entry.dim:
                raise InvalidArgument(f"vectors of width {vectors.shape[1]} for a space of width {entry.dim}")
            fresh = [(w, v) for w, v in zip(words, vectors) if w not in entry.ids]
            if not fresh:
                return
            ids = np.arange(entry.next_id, entry.next_id + len(fresh), dtype=np.int64)
            entry.index.add_with_ids(np.stack([v for _, v in fresh]), ids)
            for (word, _), vid in zip(fresh, ids.tolist()):
                self._tick += 1
                entry.ids[word] = vid
                entry.used[word] = self._tick
            entry.next_id += len(fresh)
            entry.dirty = True
            self._evict()

    def nearest(self, space: Space, query: str | np.ndarray, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` cached words closest to a cached word or a vector, by cosine similarity."""
        import faiss

        if k < 1:
            raise InvalidArgument("k must be at least 1")
        with self._lock:
            entry = self._spaces.get(space.digest)
            if entry is None or not entry.ids:
                raise NotFound("no vectors are cached in that space")
            if isinstance(query, str):
                if query not in entry.ids:
                    raise NotFound(f"{query!r} is not cached in that space")
                q = entry.index.reconstruct(entry.ids[query])[None, :]
            else:
                q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
                if q.shape[1] != entry.dim:
                    raise InvalidArgument(f"query of width {q.shape[1]} for a space of width {entry.dim}")
            words = list(entry.ids)
            base = entry.index.reconstruct_batch(np.fromiter(entry.ids.values(), np.int64, len(words)))
        # cosine = inner product of unit vectors; zero vectors have no direction and are skipped
        q = q.copy()
        faiss.normalize_L2(q)
        faiss.normalize_L2(base)
        sims, idx = faiss.knn(q, base, min(k, len(words)), faiss.METRIC_INNER_PRODUCT)
        return [(words[i], float(s)) for s, i in zip(sims[0], idx[0]) if i >= 0]

    def __len__(self) -> int:
        return sum(len(e.ids) for e in self._spaces.values())

    # ---- bounds ----------------------------------------------------------------------------
    def _evict(self) -> None:
        excess = len(self) - self.max_vectors
        if excess <= 0:
            return
        ranked = sorted((tick, key, word) for key, e in self._spaces.items() for word, tick in e.used.items())
        for _, key, word in ranked[:excess]:
            entry = self._spaces[key]
            entry.index.remove_ids(np.array([entry.ids.pop(word)], dtype=np.int64))
            entry.used.pop(word)
            entry.dirty = True
        self.stats.evictions += excess
        for key in [k for k, e in self._spaces.items() if not e.ids]:
            del self._spaces[key]

    # ---- persistence -----------------------------------------------------------------------
    def flush(self) -> None:
        """Write changed spaces and then the manifest, each atomically.

        A write that fails (``StorageFull``, ``StorageReadOnly``, any OSError) raises and leaves
        the previous manifest and its files as they were; the changed spaces stay marked dirty,
        so the next flush writes them again, and the vectors in memory are unaffected.
        """
        if self.root is None:
            return
        import faiss

        with self._lock:
            files: dict[str, dict] = {}
            written: list[_SpaceIndex] = []
            try:
                for key, entry in self._spaces.items():
                    if not entry.dirty and key in self._manifest_files:
                        files[key] = self._manifest_files[key]
                        continue
                    index_bytes = faiss.serialize_index(entry.index).tobytes()
                    keys_bytes = json.dumps({"space": entry.space.model_dump(), "dim": entry.dim, "ids": entry.ids,
                                             "used": entry.used, "next_id": entry.next_id}).encode()
                    files[key] = {}
                    for kind, data in (("faiss", index_bytes), ("keys.json", keys_bytes)):
                        digest = sha256_bytes(data)
                        name = f"{key}.{digest[:16]}.{kind}"  # content-addressed: never overwrites a live file
                        if not (self.root / name).exists():
                            atomic_write_bytes(self.root / name, data, STORE)
                        files[key][name] = digest
                    written.append(entry)
                atomic_write_json(self.root / MANIFEST, {"format": FORMAT, "tick": self._tick, "spaces": files},
                                  STORE)
            except BaseException:
                self.stats.failed_flushes += 1
                raise
            for entry in written:  # only now: a failed flush must be retried by the next one
                entry.dirty = False
            self._manifest_files = files
            live = {name for f in files.values() for name in f} | {MANIFEST}
            for stale in self.root.iterdir():
                # files no manifest names, and temporary files of a writer killed mid-write
                # (one process writes a cache folder, so none of them is in progress)
                temporary = stale.name.startswith(".") and stale.name.endswith(".tmp")
                if stale.is_file() and stale.name not in live and (temporary or not stale.name.startswith(".")):
                    stale.unlink(missing_ok=True)

    def _load(self) -> None:
        import faiss

        manifest_path = self.root / MANIFEST
        if not manifest_path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            return
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != FORMAT:
                raise ValueError(f"unknown cache format {manifest.get('format')!r}")
            spaces: dict[str, _SpaceIndex] = {}
            for key, files in manifest["spaces"].items():
                blobs = {}
                for name, digest in files.items():
                    data = (self.root / name).read_bytes()
                    if sha256_bytes(data) != digest:
                        raise ValueError(f"checksum mismatch in {name}")
                    blobs[name] = data
                by_kind = {("faiss" if name.endswith(".faiss") else "keys"): data for name, data in blobs.items()}
                meta = json.loads(by_kind["keys"])
                index = faiss.deserialize_index(np.frombuffer(by_kind["faiss"], dtype=np.uint8))
                entry = _SpaceIndex(Space(**meta["space"]), int(meta["dim"]), index, dict(meta["ids"]),
                                    {w: int(t) for w, t in meta["used"].items()}, int(meta["next_id"]), False)
                if entry.space.digest != key or index.ntotal != len(entry.ids) or index.d != entry.dim:
                    raise ValueError(f"space {key} does not match its index")
                spaces[key] = entry
            self._spaces = spaces
            self._tick = int(manifest.get("tick", 0))
            self._manifest_files = dict(manifest["spaces"])
        except Exception as exc:  # any damage: set the whole cache aside, start empty
            aside = self.root.with_name(f"{self.root.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns()}")
            self.root.rename(aside)
            self.root.mkdir(parents=True)
            self._spaces, self._manifest_files = {}, {}
            self.stats.corrupt_rebuilds += 1
            logger.warning("vector cache was damaged (%s); moved to %s and started empty", exc, aside)
