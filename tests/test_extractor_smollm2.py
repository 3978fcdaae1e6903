"""The served extractor on the real embedded model, SmolLM2-135M-Instruct.

The tiny random Llama of ``test_extractor_service.py`` checks the plumbing; only a real model
checks that what reaches a client is what the model says: its tokenizer, chat template and
digit tokens. Every served number is recomputed here from the same converted weights: a rating
from one unbatched forward pass per prompt (no padding, no reused prefix), a greedy answer from
``generate``, and activations from ``iter_activations``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from conftest import ServiceProcess, unbatched_rating
from sensorium import wire
from sensorium.activations import iter_activations
from sensorium.models import DEFAULT_MODEL, LoadedModel, ModelRegistry, ModelStore
from sensorium.prompts import chat_prompt, default_template
from sensorium.v1 import extractor_pb2 as epb
from sensorium.v1 import extractor_pb2_grpc as epb_grpc

pytestmark = pytest.mark.slow

WORDS = ["lemon", "thunder", "velvet", "chair"]
DIMENSIONS = ["gustatory", "auditory"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, smollm2_store: ModelStore) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("svc")
    env = {"SENSORIUM_EXTRACTOR_PRELOAD": json.dumps([DEFAULT_MODEL]),
           "SENSORIUM_EXTRACTOR_MODELS_DIR": str(smollm2_store.root),
           "SENSORIUM_EXTRACTOR_ADAPTERS_DIR": str(tmp / "adapters")}
    # Readiness waits for the preload, which converts the GGUF when this is the run's first use.
    svc = ServiceProcess("extractor", tmp, env, timeout=300)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[epb_grpc.ExtractorStub]:
    with grpc.insecure_channel(service.address) as channel:
        yield epb_grpc.ExtractorStub(channel)


@pytest.fixture(scope="module")
def local(service: ServiceProcess, smollm2_store: ModelStore) -> LoadedModel:
    """The same store's model in this process; after the service, so that at most one of the two
    ever converts into the shared store and the other only reads the finished entry."""
    return ModelRegistry.default(smollm2_store).load(DEFAULT_MODEL)


def prompt_of(dimension: str, tokenizer: object) -> Callable[[str], str]:
    template = default_template("en", dimension)
    return lambda word: chat_prompt(template.render(word), tokenizer)


def greedy_answer(local: LoadedModel, prompt: str, max_new_tokens: int) -> str:
    import torch

    tok = local.tokenizer
    input_ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = local.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def test_rate_equals_one_unbatched_forward_pass_per_word(stub: epb_grpc.ExtractorStub, local: LoadedModel) -> None:
    want = {(w, d): unbatched_rating(local.model, local.tokenizer, prompt_of(d, local.tokenizer)(w))
            for w in WORDS for d in DIMENSIONS}
    for max_new_tokens in (0, 4):
        reply = stub.Rate(epb.RateRequest(model=DEFAULT_MODEL, words=WORDS, dimensions=DIMENSIONS,
                                          max_new_tokens=max_new_tokens))
        assert reply.model_digest == local.digest
        assert [(r.word, r.dimension) for r in reply.ratings] == [(w, d) for w in WORDS for d in DIMENSIONS]
        for r in reply.ratings:
            expected, mass = want[(r.word, r.dimension)]
            assert r.expected == pytest.approx(expected, abs=1e-4), (r.word, r.dimension, max_new_tokens)
            assert r.mass == pytest.approx(mass, abs=1e-4), (r.word, r.dimension, max_new_tokens)
            assert 0.0 <= r.expected <= 5.0 and 0.0 < r.mass <= 1.0
            if max_new_tokens == 0:
                assert r.answer == "" and not r.HasField("parsed")
            elif r.dimension == DIMENSIONS[0]:  # generate is the slow part here: one dimension is enough
                assert r.answer == greedy_answer(local, prompt_of(r.dimension, local.tokenizer)(r.word), 4)


def test_extract_equals_in_process_then_hits_cache(stub: epb_grpc.ExtractorStub, local: LoadedModel) -> None:
    words, layers = WORDS[:2], [local.n_layers // 2, local.n_layers]

    def served() -> tuple[dict[int, np.ndarray], int]:
        parts: dict[int, list[np.ndarray]] = {}
        from_cache = 0
        for chunk in stub.Extract(epb.ExtractRequest(model=DEFAULT_MODEL, words=words, layers=layers)):
            assert chunk.model_digest == local.digest
            parts.setdefault(chunk.layer, []).append(wire.matrix_from_proto(chunk.vectors, "vectors"))
            from_cache += chunk.from_cache
        return {k: np.vstack(v) for k, v in parts.items()}, from_cache

    got, from_cache = served()
    assert sorted(got) == sorted(layers) and from_cache == 0
    want: dict[int, list[np.ndarray]] = {k: [] for k in layers}
    for _, by_layer in iter_activations(local.model, local.tokenizer, words, layers, "last", None, batch_size=2):
        for k, v in by_layer.items():
            want[k].append(v)
    for k in layers:
        assert got[k].shape == (len(words), local.hidden_size)
        np.testing.assert_allclose(got[k], np.vstack(want[k]), atol=1e-4)
    again, from_cache = served()
    assert from_cache == len(words) * len(layers)
    for k in layers:
        np.testing.assert_array_equal(again[k], got[k])


def test_model_store_is_the_shared_one(smollm2_store: ModelStore, service: ServiceProcess) -> None:
    """The service converted into (or read from) MODELS_DIR, not into its own data folder."""
    assert (smollm2_store.root / DEFAULT_MODEL).is_dir()
    assert not (service.log.parent / "extractor" / "models" / DEFAULT_MODEL).exists()
