"""The FAISS-backed vector cache: exact round trips, persistence, damage, bounds, neighbours."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from sensorium.cache import MANIFEST, Space, VectorCache
from sensorium.errors import InvalidArgument, NotFound

SPACE = Space(model="m" * 64, adapter="", template="t1", pooling="last", layer=3)


def vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_round_trip_is_exact_and_counted() -> None:
    cache = VectorCache(None)
    v = vectors(5)
    cache.put_many(SPACE, list("abcde"), v)
    hits, misses = cache.get_many(SPACE, ["a", "e", "zz"])
    assert misses == ["zz"] and np.array_equal(hits["e"], v[4]) and np.array_equal(hits["a"], v[0])
    assert (cache.stats.hits, cache.stats.misses) == (2, 1)
    other = SPACE.model_copy(update={"layer": 4})
    assert other.digest != SPACE.digest and cache.get_many(other, ["a"])[1] == ["a"]


def test_persists_across_restarts_and_keeps_old_files_until_the_manifest_moves(tmp_path: Path) -> None:
    cache = VectorCache(tmp_path / "c")
    v = vectors(4)
    cache.put_many(SPACE, ["w0", "w1", "w2", "w3"], v)
    cache.flush()
    before = {p.name for p in (tmp_path / "c").iterdir()}
    cache.put_many(SPACE, ["w4"], vectors(1, seed=1))
    reopened = VectorCache(tmp_path / "c")  # a reader before the second flush sees the first state
    assert reopened.get_many(SPACE, ["w3", "w4"])[1] == ["w4"]
    cache.flush()
    after = {p.name for p in (tmp_path / "c").iterdir()}
    assert MANIFEST in after and after != before
    hits, misses = VectorCache(tmp_path / "c").get_many(SPACE, ["w0", "w3", "w4"])
    assert not misses and np.array_equal(hits["w3"], v[3])


@pytest.mark.parametrize("damage", ["flip a byte of the index", "truncate the keys", "garble the manifest",
                                    "delete the index"])
def test_damage_is_detected_moved_aside_and_never_served(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "c"
    cache = VectorCache(root)
    cache.put_many(SPACE, ["a", "b"], vectors(2))
    cache.flush()
    index = next(root.glob("*.faiss"))
    keys = next(root.glob("*.keys.json"))
    if damage == "flip a byte of the index":
        data = bytearray(index.read_bytes())
        data[-3] ^= 0xFF
        index.write_bytes(bytes(data))
    elif damage == "truncate the keys":
        keys.write_bytes(keys.read_bytes()[:10])
    elif damage == "garble the manifest":
        (root / MANIFEST).write_text("{not json")
    else:
        index.unlink()
    fresh = VectorCache(root)
    assert fresh.stats.corrupt_rebuilds == 1
    assert fresh.get_many(SPACE, ["a", "b"])[1] == ["a", "b"]
    assert len(list(tmp_path.glob("c.corrupt-*"))) == 1
    fresh.put_many(SPACE, ["a"], vectors(1))
    fresh.flush()
    assert VectorCache(root).stats.corrupt_rebuilds == 0


def test_bounded_with_least_recently_used_eviction() -> None:
    cache = VectorCache(None, max_vectors=5)
    cache.put_many(SPACE, list("abcde"), vectors(5))
    cache.get_many(SPACE, ["a"])  # a is now the most recently used
    cache.put_many(SPACE, ["f", "g"], vectors(2, seed=3))
    assert len(cache) == 5 and cache.stats.evictions == 2
    hits, misses = cache.get_many(SPACE, list("abcdefg"))
    assert sorted(misses) == ["b", "c"] and "a" in hits


def test_lookups_after_evictions_return_each_words_own_vector() -> None:
    # Removing ids shifts the rows of the flat index: lookups must still go by id, not by row.
    cache = VectorCache(None, max_vectors=6)
    words = [f"w{i}" for i in range(10)]
    v = vectors(10, seed=7)
    cache.put_many(SPACE, words[:6], v[:6])
    cache.get_many(SPACE, ["w0", "w2", "w4"])
    cache.put_many(SPACE, words[6:], v[6:])
    hits, misses = cache.get_many(SPACE, words[::-1])
    assert sorted(misses) == ["w0", "w1", "w3", "w5"]  # the four least recently used
    for w in hits:
        assert np.array_equal(hits[w], v[int(w[1:])]), w
    assert [w for w, _ in cache.nearest(SPACE, v[8], k=1)] == ["w8"]


def test_nearest_by_cosine_matches_brute_force() -> None:
    cache = VectorCache(None)
    v = vectors(50, d=8, seed=5)
    words = [f"w{i}" for i in range(50)]
    cache.put_many(SPACE, words, v)
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    expected = np.argsort(-(unit @ unit[7]))[:5]
    got = cache.nearest(SPACE, "w7", k=5)
    assert [w for w, _ in got] == [words[i] for i in expected]
    assert got[0] == ("w7", pytest.approx(1.0, abs=1e-6))
    by_vector = cache.nearest(SPACE, v[7] * 3.0, k=5)
    assert [w for w, _ in by_vector] == [w for w, _ in got]
    with pytest.raises(NotFound):
        cache.nearest(SPACE, "nope")
    with pytest.raises(InvalidArgument):
        cache.nearest(SPACE, np.ones(3))


def test_bad_vectors_are_refused() -> None:
    cache = VectorCache(None)
    with pytest.raises(InvalidArgument):
        cache.put_many(SPACE, ["a"], np.full((1, 4), np.nan))
    cache.put_many(SPACE, ["a"], vectors(1, d=4))
    with pytest.raises(InvalidArgument, match="width"):
        cache.put_many(SPACE, ["b"], vectors(1, d=5))


def test_concurrent_use_from_threads(tmp_path: Path) -> None:
    cache = VectorCache(tmp_path / "c", max_vectors=300)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(30):
                words = [f"t{k}-{i}-{j}" for j in range(5)]
                cache.put_many(SPACE, words, vectors(5, seed=k * 100 + i))
                cache.get_many(SPACE, words)
                if i % 10 == 0:
                    cache.flush()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) == 300
    cache.flush()
    assert len(VectorCache(tmp_path / "c")) == 300
