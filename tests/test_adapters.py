"""The adapter store: what the trainer publishes is complete, verified and never overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import publish_lora
from sensorium.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from sensorium.models.adapters import CONFIG, MANIFEST, WEIGHTS, AdapterHost, AdapterStore
from sensorium.models.store import ModelSpec, ModelStore, PathSource, load_model, model_digest


@pytest.fixture()
def store(tmp_path: Path, tiny_model_path: Path) -> AdapterStore:
    publish_lora(tiny_model_path, tmp_path / "adapters", "one", seed=1)
    return AdapterStore(tmp_path / "adapters")


def test_publish_writes_a_verified_entry(store: AdapterStore, tiny_model_path: Path) -> None:
    manifest = store.manifest("one", verify=True)
    assert manifest.base_digest == model_digest(tiny_model_path) and manifest.training == {"seed": 1}
    assert sorted(p.name for p in store.path("one").iterdir()) == sorted([CONFIG, WEIGHTS, MANIFEST])
    assert [m.id for m in store.list()] == ["one"]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_publish_never_overwrites(store: AdapterStore, tiny_model_path: Path) -> None:
    before = store.manifest("one").digest
    with pytest.raises(AlreadyExists):
        publish_lora(tiny_model_path, store.root, "one", seed=2)
    assert store.manifest("one", verify=True).digest == before


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / CONFIG).write_text("{}")
    (src / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FailedPrecondition, match="pickle"):
        AdapterStore(tmp_path / "adapters").publish("x", src, base_model="m", base_digest="0" * 64)


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_entries_are_detected_not_served(store: AdapterStore, damage: str) -> None:
    path = store.path("one")
    weights = path / WEIGHTS
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif damage == "flip":  # same size: only the checksum tells
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (path / MANIFEST).write_text(json.dumps({"format": 1}))
    with pytest.raises(FailedPrecondition):
        store.read("one")
    if damage != "flip":
        assert store.list() == []  # listing checks sizes; reading checks every byte


def test_ids_cannot_leave_the_store(store: AdapterStore) -> None:
    for bad in ("../one", "/etc", ".hidden", "", "a/b", "x" * 65):
        with pytest.raises(InvalidArgument):
            store.path(bad)
    with pytest.raises(NotFound):
        store.manifest("absent")


def test_delete_removes_the_entry_whole(store: AdapterStore) -> None:
    store.delete("one")
    assert store.list() == [] and not store.path("one").exists()
    with pytest.raises(NotFound):
        store.delete("one")


def test_host_keeps_at_most_max_loaded(store: AdapterStore, tiny_model_path: Path, tmp_path: Path) -> None:
    publish_lora(tiny_model_path, store.root, "two", seed=2)
    model = load_model(ModelSpec(name="tiny", source=PathSource(path=tiny_model_path), device="cpu"),
                       ModelStore(tmp_path / "models"))
    host = AdapterHost(model.model, "tiny", model.digest, store, max_loaded=1)
    x = torch.tensor([[3, 5, 7, 9]])

    def logits(adapter: str | None) -> torch.Tensor:
        with host.use(adapter), torch.inference_mode():
            return model.model(x).logits

    base, one = logits(None), logits("one")
    two = logits("two")
    assert [m.id for m in host.loaded()] == ["two"]  # "one" made room
    assert torch.equal(logits("one"), one) and torch.equal(logits(None), base)
    assert not torch.allclose(one, two)
    host.unload("one")
    assert host.loaded() == [] and torch.equal(logits(None), base)


def test_unfinished_build_folders_are_removed_once_old(tmp_path: Path) -> None:
    """A publisher killed half way leaves a hidden build folder; an old one is removed, a fresh one
    (perhaps another publisher's, right now) is kept, and nothing else is touched."""
    import os
    import time

    from sensorium.models.adapters import AdapterStore

    store = AdapterStore(tmp_path)
    old, fresh, other = tmp_path / ".a1.tmp-x1y2", tmp_path / ".a2.tmp-z3", tmp_path / ".keep"
    for folder in (old, fresh, other):
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
    an_hour_ago = time.time() - 3_700
    os.utime(old, (an_hour_ago, an_hour_ago))
    os.utime(other, (an_hour_ago, an_hour_ago))
    assert store.remove_unfinished() == [".a1.tmp-x1y2"]
    assert not old.exists() and fresh.exists() and other.exists()
    assert store.remove_unfinished(min_age_seconds=0) == [".a2.tmp-z3"]
