"""The extractor as it is deployed: ``python -m services.extractor`` on a loopback port.

The model is the tiny random Llama built offline, so every number can be checked against the
library computed in this process on the same weights; the embedded default model is never loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServiceProcess, extractor_env
from sensorium import wire
from sensorium.activations import iter_activations, resolve_layers
from sensorium.models.adapters import AdapterHost, AdapterStore
from sensorium.models.store import DEFAULT_MODEL, LoadedModel, ModelSpec, ModelStore, PathSource, load_model
from sensorium.prompts import chat_prompt, default_template
from sensorium.ratings import rate
from sensorium.v1 import extractor_pb2 as epb
from sensorium.v1 import extractor_pb2_grpc as epb_grpc

WORDS = ["apple", "music", "kick", "justice", "thunderstorm", "Zebra-crossing", "hot", "smell"]
DIMENSIONS = ["auditory", "hand_arm", "gustatory"]
MAX_WORDS = 50


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path,
            tiny_adapters: list[str]) -> Iterator[ServiceProcess]:
    svc = ServiceProcess("extractor", tmp_path_factory.mktemp("svc"),
                         extractor_env(tiny_model_path, SENSORIUM_EXTRACTOR_MAX_WORDS=str(MAX_WORDS)))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[epb_grpc.ExtractorStub]:
    with grpc.insecure_channel(service.address) as channel:
        yield epb_grpc.ExtractorStub(channel)


@pytest.fixture(scope="module")
def local(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    spec = ModelSpec(name="tiny", source=PathSource(path=tiny_model_path), device="cpu")
    return load_model(spec, ModelStore(tmp_path_factory.mktemp("store")))


def extract(stub: epb_grpc.ExtractorStub, words: list[str], **fields) -> tuple[dict[int, np.ndarray], int]:
    """Reassemble the stream into one words x width matrix per layer, and count cache hits."""
    parts: dict[int, dict[int, np.ndarray]] = {}
    from_cache = 0
    for chunk in stub.Extract(epb.ExtractRequest(model="tiny", words=words, **fields)):
        assert list(chunk.words) == words[chunk.first_word_index:chunk.first_word_index + len(chunk.words)]
        assert chunk.vectors.dtype == wire.cpb.DTYPE_FLOAT32
        parts.setdefault(chunk.layer, {})[chunk.first_word_index] = wire.matrix_from_proto(chunk.vectors, "v")
        from_cache += chunk.from_cache
    return {k: np.vstack([p[i] for i in sorted(p)]) for k, p in parts.items()}, from_cache


def reference(local: LoadedModel, words: list[str], layers: list[int], pooling: str,
              template: str | None = None) -> dict[int, np.ndarray]:
    render = None
    if template is not None:
        t = default_template("en", template)
        render = lambda w: chat_prompt(t.render(w), local.tokenizer)  # noqa: E731
    out: dict[int, list[np.ndarray]] = {k: [] for k in layers}
    for _, by_layer in iter_activations(local.model, local.tokenizer, words, layers, pooling, render, batch_size=3):
        for k, v in by_layer.items():
            out[k].append(v)
    return {k: np.vstack(v) for k, v in out.items()}


def test_health_and_readiness(service: ServiceProcess) -> None:
    with grpc.insecure_channel(service.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "sensorium.v1.Extractor"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_list_models(stub: epb_grpc.ExtractorStub, local: LoadedModel) -> None:
    models = {m.name: m for m in stub.ListModels(epb.ListModelsRequest()).models}
    assert set(models) == {"tiny", DEFAULT_MODEL}
    tiny = models["tiny"]
    assert tiny.loaded and tiny.kind == "causal-lm" and tiny.digest == local.digest
    assert (tiny.n_layers, tiny.hidden_size, tiny.device) == (local.n_layers, local.hidden_size, "cpu")
    assert not models[DEFAULT_MODEL].loaded  # preload names only the tiny model


def test_rate_equals_in_process(stub: epb_grpc.ExtractorStub, local: LoadedModel) -> None:
    reply = stub.Rate(epb.RateRequest(model="tiny", words=WORDS, dimensions=DIMENSIONS, max_new_tokens=4,
                                      batch_size=8))
    assert reply.model_digest == local.digest
    assert [(t.dimension, t.digest) for t in reply.templates] == \
        [(d, default_template("en", d).digest) for d in DIMENSIONS]
    assert [(r.word, r.dimension) for r in reply.ratings] == [(w, d) for w in WORDS for d in DIMENSIONS]
    got = {(r.word, r.dimension): r for r in reply.ratings}
    for d in DIMENSIONS:
        t = default_template("en", d)
        want = rate(local.model, local.tokenizer, WORDS, lambda w: chat_prompt(t.render(w), local.tokenizer),
                    batch_size=8, max_new_tokens=4)
        for i, w in enumerate(WORDS):
            r = got[(w, d)]
            assert r.expected == pytest.approx(want.expected[i], abs=1e-5)
            assert r.mass == pytest.approx(want.mass[i], abs=1e-5)
            assert r.answer == want.answers[i]
            assert (r.parsed if r.HasField("parsed") else None) == want.parsed[i]
            assert r.prefix_reused == bool(want.prefix_reused[i])


def test_extract_equals_in_process_then_hits_cache(stub: epb_grpc.ExtractorStub, local: LoadedModel) -> None:
    fields = dict(layers=[0, -1], relative_depths=[0.5], pooling="word-mean", batch_size=3)
    layers = resolve_layers([0, -1, 0.5], local.n_layers)
    got, from_cache = extract(stub, WORDS, **fields)
    assert sorted(got) == sorted(layers) and from_cache == 0
    want = reference(local, WORDS, layers, "word-mean")
    for k in layers:
        assert got[k].shape == (len(WORDS), local.hidden_size)
        np.testing.assert_allclose(got[k], want[k], atol=1e-5)
    again, from_cache = extract(stub, WORDS, **fields)
    assert from_cache == len(WORDS) * len(layers)
    for k in layers:
        np.testing.assert_array_equal(again[k], got[k])
    # A partly cached request computes only the new words, and a template is a separate space.
    _, from_cache = extract(stub, WORDS + ["bread"], **fields)
    assert from_cache == len(WORDS) * len(layers)
    templated, from_cache = extract(stub, WORDS[:3], layers=[1], template=epb.TemplateRef(dimension="visual"))
    assert from_cache == 0
    np.testing.assert_allclose(templated[1], reference(local, WORDS[:3], [1], "last", "visual")[1], atol=1e-5)


def test_nearest_returns_the_word_first(stub: epb_grpc.ExtractorStub) -> None:
    extract(stub, WORDS, layers=[2])
    reply = stub.Nearest(epb.NearestRequest(model="tiny", layer=-1, word="music", k=3))
    assert [n.word for n in reply.neighbours][0] == "music" and len(reply.neighbours) == 3
    assert reply.neighbours[0].cosine == pytest.approx(1.0, abs=1e-5)
    vectors, _ = extract(stub, ["kick"], layers=[2])
    by_vector = stub.Nearest(epb.NearestRequest(model="tiny", layer=2, vector=wire.matrix_to_proto(vectors[2]), k=1))
    assert by_vector.neighbours[0].word == "kick"


BAD = [
    ("unknown model", "Rate", epb.RateRequest(model="nope", words=["a"]), grpc.StatusCode.NOT_FOUND),
    ("unknown dimension", "Rate", epb.RateRequest(model="tiny", words=["a"], dimensions=["smellish"]),
     grpc.StatusCode.NOT_FOUND),
    ("unknown language", "Rate", epb.RateRequest(model="tiny", words=["a"], language="xx"), grpc.StatusCode.NOT_FOUND),
    ("unknown template", "Extract", epb.ExtractRequest(model="tiny", words=["a"], template=epb.TemplateRef(
        dimension="hand_arm", language="nl")), grpc.StatusCode.NOT_FOUND),
    ("no words", "Extract", epb.ExtractRequest(model="tiny"), grpc.StatusCode.INVALID_ARGUMENT),
    ("duplicate words", "Rate", epb.RateRequest(model="tiny", words=["a", "b", "a"]), grpc.StatusCode.INVALID_ARGUMENT),
    ("control character", "Extract", epb.ExtractRequest(model="tiny", words=["a\x07b"]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("too long", "Extract", epb.ExtractRequest(model="tiny", words=["x" * 65]), grpc.StatusCode.INVALID_ARGUMENT),
    ("bad pooling", "Extract", epb.ExtractRequest(model="tiny", words=["a"], pooling="max"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("layer out of range", "Extract", epb.ExtractRequest(model="tiny", words=["a"], layers=[3]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("depth out of range", "Extract", epb.ExtractRequest(model="tiny", words=["a"], relative_depths=[1.5]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("too many words", "Rate", epb.RateRequest(model="tiny", words=[f"w{i}" for i in range(MAX_WORDS + 1)]),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("uncached word", "Nearest", epb.NearestRequest(model="tiny", layer=1, word="never-seen"),
     grpc.StatusCode.NOT_FOUND),
    ("unknown adapter", "Rate", epb.RateRequest(model="tiny", words=["a"], adapter="nope"), grpc.StatusCode.NOT_FOUND),
    ("path-like adapter", "Extract", epb.ExtractRequest(model="tiny", words=["a"], adapter="../../etc"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("adapter of another model", "Rate", epb.RateRequest(model="tiny", words=["a"], adapter="foreign"),
     grpc.StatusCode.FAILED_PRECONDITION),
    ("adapter of another model", "Nearest", epb.NearestRequest(model="tiny", layer=1, word="a", adapter="foreign"),
     grpc.StatusCode.FAILED_PRECONDITION),
    ("load without adapter", "LoadAdapter", epb.AdapterRequest(model="tiny"), grpc.StatusCode.INVALID_ARGUMENT),
    ("load foreign adapter", "LoadAdapter", epb.AdapterRequest(model="tiny", adapter="foreign"),
     grpc.StatusCode.FAILED_PRECONDITION),
    ("load on unknown model", "LoadAdapter", epb.AdapterRequest(model="nope", adapter="tiny-a"),
     grpc.StatusCode.NOT_FOUND),
    ("unload what is not loaded", "UnloadAdapter", epb.AdapterRequest(model="tiny", adapter="foreign"),
     grpc.StatusCode.NOT_FOUND),
    ("list for unknown model", "ListAdapters", epb.ListAdaptersRequest(model="nope"), grpc.StatusCode.NOT_FOUND),
]


@pytest.mark.parametrize(("method", "request_", "code"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_are_refused_and_service_keeps_serving(stub: epb_grpc.ExtractorStub, method: str,
                                                            request_, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as info:
        reply = getattr(stub, method)(request_)
        if method == "Extract":
            list(reply)
    assert info.value.code() == code
    assert info.value.details() and "internal error" not in info.value.details()
    assert stub.Rate(epb.RateRequest(model="tiny", words=["apple"], dimensions=["visual"])).ratings


@pytest.fixture(scope="module")
def local_host(tiny_model_path: Path, tiny_adapters: list[str], tmp_path_factory: pytest.TempPathFactory):
    """An in-process copy of the model with the same adapter store: the reference for adapter results."""
    spec = ModelSpec(name="tiny", source=PathSource(path=tiny_model_path), device="cpu")
    model = load_model(spec, ModelStore(tmp_path_factory.mktemp("store-adapters")))
    return model, AdapterHost(model.model, "tiny", model.digest, AdapterStore(tiny_model_path.parent / "adapters"))


def adapters_listed(stub: epb_grpc.ExtractorStub, model: str = "") -> dict[str, epb.AdapterInfo]:
    return {a.id: a for a in stub.ListAdapters(epb.ListAdaptersRequest(model=model)).adapters}


def test_adapters_are_listed_from_the_store(stub: epb_grpc.ExtractorStub, local: LoadedModel) -> None:
    listed = adapters_listed(stub)
    assert set(listed) == {"tiny-a", "tiny-b", "foreign"}
    assert set(adapters_listed(stub, "tiny")) == {"tiny-a", "tiny-b"}
    a = listed["tiny-a"]
    assert (a.base_model, a.base_digest) == ("tiny", local.digest) and len(a.digest) == 64
    assert json.loads(a.training_json) == {"seed": 1}
    assert listed["tiny-a"].digest != listed["tiny-b"].digest


def test_adapter_switch_per_request_on_one_resident_model(stub: epb_grpc.ExtractorStub, local_host) -> None:
    model, host = local_host
    words, dims = WORDS[:5], ["visual", "auditory"]

    def served(adapter: str) -> np.ndarray:
        reply = stub.Rate(epb.RateRequest(model="tiny", words=words, dimensions=dims, adapter=adapter,
                                          max_new_tokens=2))
        assert reply.adapter == adapter
        assert reply.adapter_digest == (adapters_listed(stub)[adapter].digest if adapter else "")
        return np.array([[r.expected, r.mass] for r in reply.ratings])

    def in_process(adapter: str | None) -> np.ndarray:
        with host.use(adapter):
            per_dim = [rate(model.model, model.tokenizer, words,
                            lambda w, t=default_template("en", d): chat_prompt(t.render(w), model.tokenizer))
                       for d in dims]
        return np.array([[r.expected[i], r.mass[i]] for i in range(len(words)) for r in per_dim])

    base = served("")
    with_a, with_b = served("tiny-a"), served("tiny-b")
    assert not np.allclose(with_a, base, atol=1e-4) and not np.allclose(with_b, with_a, atol=1e-4)
    np.testing.assert_allclose(with_a, in_process("tiny-a"), atol=1e-5)
    np.testing.assert_allclose(with_b, in_process("tiny-b"), atol=1e-5)
    np.testing.assert_array_equal(served(""), base)  # adapters resident, base unchanged
    np.testing.assert_allclose(base, in_process(None), atol=1e-5)
    listed = adapters_listed(stub)
    assert listed["tiny-a"].loaded and listed["tiny-b"].loaded and not listed["foreign"].loaded
    models = {m.name: m for m in stub.ListModels(epb.ListModelsRequest()).models}
    assert models["tiny"].loaded  # the same resident model, never reloaded

    assert stub.UnloadAdapter(epb.AdapterRequest(model="tiny", adapter="tiny-b")).loaded is False
    assert not adapters_listed(stub)["tiny-b"].loaded
    np.testing.assert_array_equal(served("tiny-b"), with_b)  # loaded again on demand
    assert stub.LoadAdapter(epb.AdapterRequest(model="tiny", adapter="tiny-b")).loaded


def test_adapter_vectors_live_in_their_own_cache_space(stub: epb_grpc.ExtractorStub, local_host) -> None:
    model, host = local_host
    words = ["lemon", "drum", "velvet"]
    base, _ = extract(stub, words, layers=[2])
    tuned, from_cache = extract(stub, words, layers=[2], adapter="tiny-a")
    assert from_cache == 0 and not np.allclose(tuned[2], base[2], atol=1e-4)
    with host.use("tiny-a"):
        np.testing.assert_allclose(tuned[2], reference(model, words, [2], "last")[2], atol=1e-5)
    chunk = next(iter(stub.Extract(epb.ExtractRequest(model="tiny", words=words, layers=[2], adapter="tiny-a"))))
    assert chunk.from_cache == len(words) and chunk.adapter_digest == adapters_listed(stub)["tiny-a"].digest
    again, from_cache = extract(stub, words, layers=[2])
    assert from_cache == len(words) and chunk.adapter_digest != ""
    np.testing.assert_array_equal(again[2], base[2])
    near = stub.Nearest(epb.NearestRequest(model="tiny", layer=2, word="drum", adapter="tiny-a", k=3))
    assert near.neighbours[0].word == "drum" and {n.word for n in near.neighbours} == set(words)


def test_typed_client(service: ServiceProcess, local: LoadedModel) -> None:
    from sensorium.client import ExtractorClient

    words = ["pepper", "violin", "moss"]
    with ExtractorClient(service.address) as client:
        assert "tiny" in {m.name for m in client.list_models()}
        got = client.extract("tiny", words, layers=[1, -1], pooling="mean")
        want = reference(local, words, [1, local.n_layers], "mean")
        assert sorted(got.layers) == [1, local.n_layers] and got.model_digest == local.digest
        for layer, matrix in got.layers.items():
            np.testing.assert_allclose(matrix, want[layer], atol=1e-5)
        again = client.extract("tiny", words, layers=[1, -1], pooling="mean")
        assert again.from_cache == 2 * len(words)
        assert client.nearest("tiny", 1, "violin", k=2, pooling="mean")[0][0] == "violin"
        rated = client.rate("tiny", words, ["visual"], max_new_tokens=0)
        assert [r.word for r in rated.ratings] == words and all(0 <= r.expected <= 5 for r in rated.ratings)
        assert {a.id for a in client.list_adapters("tiny")} == {"tiny-a", "tiny-b"}
        assert client.load_adapter("tiny", "tiny-a").loaded
        tuned = client.extract("tiny", words, layers=[1], adapter="tiny-a")
        assert tuned.adapter_digest == client.load_adapter("tiny", "tiny-a").digest
        assert client.rate("tiny", words, ["visual"], adapter="tiny-a").adapter == "tiny-a"
        assert client.nearest("tiny", 1, "moss", k=1, adapter="tiny-a")[0][0] == "moss"
        assert client.unload_adapter("tiny", "tiny-a").loaded is False


def test_command_line(service: ServiceProcess, local: LoadedModel, tmp_path: Path, capsys) -> None:
    from sensorium.cli import main
    from sensorium.tables import read_table

    def run(*argv: str) -> tuple[int, dict | None, str]:
        code = main(["extract", *argv, "--server", service.address])
        out, err = capsys.readouterr()
        return code, (json.loads(out) if code == 0 else None), err

    words_file = tmp_path / "words.txt"
    words_file.write_text("# a comment\napple\n\nmusic\n")
    code, out, _ = run("rate", "kick", "--words-file", str(words_file), "--model", "tiny",
                       "--dimensions", "visual,auditory", "--max-new-tokens", "2", "--out", str(tmp_path / "r.csv"))
    assert code == 0 and out["n_words"] == 3 and out["dimensions"] == ["visual", "auditory"]
    assert 0 <= out["parse_rate"] <= 1 and out["model_digest"] == local.digest
    table = read_table(tmp_path / "r.csv")
    assert list(table.words) == ["kick", "apple", "music"]
    with grpc.insecure_channel(service.address) as channel:
        reply = epb_grpc.ExtractorStub(channel).Rate(
            epb.RateRequest(model="tiny", words=["kick", "apple", "music"], dimensions=["visual", "auditory"]))
    want = np.array([r.expected for r in reply.ratings]).reshape(3, 2)
    got = np.column_stack([table.numeric("visual"), table.numeric("auditory")])
    np.testing.assert_allclose(got, want, atol=1e-5)

    code, out, _ = run("activations", "salt", "pepper", "--model", "tiny", "--layers", "1,-1", "--pooling", "mean",
                       "--out", str(tmp_path / "a.npz"))
    assert code == 0 and out["layers"] == [1, local.n_layers]
    saved = np.load(tmp_path / "a.npz")
    assert list(saved["words"]) == ["salt", "pepper"]
    np.testing.assert_allclose(saved["layer_1"], reference(local, ["salt", "pepper"], [1], "mean")[1], atol=1e-5)

    code, out, _ = run("adapters", "--model", "tiny")
    assert code == 0 and {a["id"] for a in out["adapters"]} == {"tiny-a", "tiny-b"}
    code, out, _ = run("models")
    assert code == 0 and "tiny" in {m["name"] for m in out["models"]}
    code, out, _ = run("nearest", "pepper", "--model", "tiny", "--layer", "1", "--pooling", "mean", "--k", "1")
    assert code == 0 and out["neighbours"][0]["word"] == "pepper"

    code, _, err = run("rate", "apple", "--model", "nope")
    assert code == 2 and err.startswith("error: NOT_FOUND") and "\n" == err[-1] and err.count("\n") == 1
    code, _, err = run("rate", "--model", "tiny")
    assert code == 2 and "no words" in err


def test_cache_survives_restart_and_corruption(service: ServiceProcess, tiny_model_path: Path,
                                               local: LoadedModel) -> None:
    """Runs last: it stops the module's service and restarts it on the same data directory."""
    words = ["salt", "sugar", "bell"]
    with grpc.insecure_channel(service.address) as ch:
        first, from_cache = extract(epb_grpc.ExtractorStub(ch), words, layers=[1])
    assert from_cache == 0
    assert service.stop() == 0
    tmp = service.log.parent
    cache = tmp / "extractor" / "cache"

    restarted = ServiceProcess("extractor", tmp, extractor_env(tiny_model_path))
    try:
        with grpc.insecure_channel(restarted.address) as ch:
            again, from_cache = extract(epb_grpc.ExtractorStub(ch), words, layers=[1])
    finally:
        assert restarted.stop() == 0
    assert from_cache == len(words)
    np.testing.assert_array_equal(again[1], first[1])

    damaged = sorted(cache.glob("*.faiss"))
    assert damaged
    for path in damaged:
        path.write_bytes(b"not an index")
    recovered = ServiceProcess("extractor", tmp, extractor_env(tiny_model_path))
    try:
        with grpc.insecure_channel(recovered.address) as ch:
            fresh, from_cache = extract(epb_grpc.ExtractorStub(ch), words, layers=[1])
    finally:
        recovered.stop()
    assert from_cache == 0
    np.testing.assert_allclose(fresh[1], reference(local, words, [1], "last")[1], atol=1e-5)
    aside = [p for p in cache.parent.iterdir() if p.name.startswith("cache.corrupt-")]
    assert len(aside) == 1 and {p.name for p in aside[0].glob("*.faiss")} == {p.name for p in damaged}
