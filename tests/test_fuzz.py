"""Every RPC of the three services, fed generated requests through real service processes.

At least 500 requests per RPC (5,000 with SENSORIUM_RELIABILITY=heavy): valid ones, valid ones
with one field made hostile, random messages and raw bytes (see ``fuzzing``). A refusal must be a
clear status with a message, never INTERNAL or UNKNOWN; the process must survive every request;
a valid request's answer must equal what the library computes for it directly, refusals
included. After each RPC's run the service still answers a valid request. The trainer is only
ever asked to validate (every Submit is forced to validate_only).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import reliability
from conftest import ServiceProcess, extractor_env
from fuzzing import KINDS, REFUSALS, Answer, Request, requests, send
from sensorium import errors, stats, wire
from sensorium.activations import POOLINGS, iter_activations, resolve_layers
from sensorium.client import ExtractorClient, TrainerClient
from sensorium.models.adapters import AdapterHost, AdapterStore
from sensorium.models.store import ModelRegistry, ModelSpec, ModelStore
from sensorium.probes import ProbeOptions, probe_models
from sensorium.prompts import available, chat_prompt
from sensorium.prompts.sets import PromptSets
from sensorium.ratings import rate
from sensorium.representations import Limits
from sensorium.rsa import run_rsa
from sensorium.rsa.layers import layer_rsa
from sensorium.tables import TableStore
from sensorium.training.jobs import JobRunner, JobStore
from sensorium.training.spec import TrainingSpec
from sensorium.v1 import analyzer_pb2 as apb
from sensorium.v1 import analyzer_pb2_grpc as apb_grpc
from sensorium.v1 import common_pb2 as cpb
from sensorium.v1 import extractor_pb2 as epb
from sensorium.v1 import extractor_pb2_grpc as epb_grpc
from sensorium.v1 import trainer_pb2 as tpb
from services.common.errors import status_for
from services.trainer.servicer import FROM_PROTO, event_to_proto, job_to_proto
from services.trainer.settings import TrainerSettings
from test_trainer_service import SPEC, trainer_env

pytestmark = pytest.mark.slow

# SENSORIUM_FUZZ_EXAMPLES changes the count, e.g. to try a change quickly
PER_RPC = int(os.environ.get("SENSORIUM_FUZZ_EXAMPLES", 5_000 if reliability.HEAVY else 500))
TIMEOUT = 60.0
VOCAB = ["apple", "music", "kick", "lemon", "thunder", "velvet", "garlic", "whisper", "hammer", "honey",
         "smoke", "river", "bell", "pepper", "silk", "drum", "ice", "rose", "stone", "salt"]
EN_DIMS = list(available()["en"])
SERVICES = {"extractor": epb, "analyzer": apb, "trainer": tpb}
TABLES = ["t1", "t2", "t3"]
Check = Callable[[Answer], None]


# ---- comparing answers with the library ------------------------------------------------------
def _close(a: Any, b: Any, tol: float, path: str = "") -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: fields {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], tol, f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, tol, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def as_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def same_outcome(compute: Callable[[], Message], tol: float = 1e-9,
                 adjust: Callable[[Message, Message], None] | None = None) -> Check:
    """The service's answer must be the library's: the same message, or the same refusal."""
    try:
        expected: Message | errors.SensoriumError = compute()
    except errors.SensoriumError as exc:
        expected = exc

    def check(answer: Answer) -> None:
        if isinstance(expected, errors.SensoriumError):
            assert (answer.code, answer.details) == (status_for(expected), str(expected))
            return
        assert answer.code == grpc.StatusCode.OK, f"{answer.code.name}: {answer.details}"
        (got,) = answer.responses
        if adjust is not None:
            adjust(expected, got)
        _close(as_dict(expected), as_dict(got), tol)

    return check


# ---- the extractor's computations, done in this process -------------------------------------
class Reference:
    """The tiny model with the same adapter store, loaded here: what the extractor must answer."""

    def __init__(self, model_path: Path, adapters: Path, store: Path) -> None:
        spec = ModelSpec.model_validate({"name": "tiny", "source": {"path": str(model_path)}, "device": "cpu"})
        self.model = ModelRegistry.default(ModelStore(store), {"tiny": spec}).load("tiny")
        self.adapters = AdapterStore(adapters)
        self.host = AdapterHost(self.model.model, "tiny", self.model.digest, self.adapters)
        self.prompts = PromptSets({})
        self.model_names = ModelRegistry.default(ModelStore(store), {"tiny": spec}).names()

    def render(self, ref: epb.TemplateRef | None) -> Callable[[str], str] | None:
        if ref is None:
            return None
        template = self.prompts.template(ref.prompts, ref.language or "en", ref.dimension)
        return lambda word: chat_prompt(template.render(word), self.model.tokenizer)

    def activations(self, words: list[str], layers: list[int], pooling: str, adapter: str,
                    template: epb.TemplateRef | None = None) -> dict[int, np.ndarray]:
        out: dict[int, list[np.ndarray]] = {k: [] for k in layers}
        with self.host.use(adapter or None):
            for _, by_layer in iter_activations(self.model.model, self.model.tokenizer, words, layers, pooling,
                                                self.render(template), 64):
                for k, vectors in by_layer.items():
                    out[k].append(np.asarray(vectors, dtype=np.float64))
        return {k: np.concatenate(v) for k, v in out.items()}


# ---- the services, started once for the whole file -----------------------------------------
@dataclass
class World:
    extractor: ServiceProcess
    analyzer: ServiceProcess
    trainer: ServiceProcess
    ref: Reference
    adapters: Path
    tables: Path
    jobs_db: Path
    trainer_settings: TrainerSettings
    job_ids: list[str]
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def process(self, service: str) -> ServiceProcess:
        return getattr(self, service)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path,
          tiny_adapters: list[str]) -> Iterator[World]:
    ws = tmp_path_factory.mktemp("fuzz")
    adapters = tiny_model_path.parent / "adapters"
    extractor = ServiceProcess("extractor", ws, extractor_env(tiny_model_path))
    analyzer = trainer = None
    try:
        analyzer = ServiceProcess("analyzer", ws, {"SENSORIUM_ANALYZER_EXTRACTOR_ADDRESS": extractor.address})
        tenv = trainer_env(tiny_model_path, ws / "trainer-adapters")
        trainer = ServiceProcess("trainer", ws, tenv)
        ref = Reference(tiny_model_path, adapters, ws / "reference-models")
        with ExtractorClient(extractor.address) as ex:  # every (layer, pooling) space holds VOCAB: Nearest finds it
            for pooling in POOLINGS:
                ex.extract("tiny", VOCAB, layers=list(range(ref.model.n_layers + 1)), pooling=pooling)
        with TrainerClient(trainer.address) as tc:  # jobs to ask about: one finished, one cancelled
            spec = {**SPEC, "optim": {**SPEC["optim"], "max_steps": 2}, "eval": {"every_steps": 2}}
            done = tc.submit(spec, adapter_id="fuzz-done").job.id
            queued = tc.submit({**spec, "seed": 9}, adapter_id="fuzz-cancelled").job.id
            tc.cancel(queued)
            tc.wait(done, timeout=300)
            tc.wait(queued, timeout=300)
        settings_env = {k.removeprefix("SENSORIUM_TRAINER_").lower(): json.loads(v) if v[:1] in "[{" else v
                        for k, v in tenv.items()}
        reference_trainer = TrainerSettings(**settings_env, data_dir=ws / "reference-trainer")
        world = World(extractor, analyzer, trainer, ref, adapters, ws / "analyzer" / "tables",
                      ws / "trainer" / "jobs.sqlite", reference_trainer, [done, queued])
        world.channels = {name: grpc.insecure_channel(world.process(name).address) for name in SERVICES}
        yield world
        for ch in world.channels.values():
            ch.close()
    finally:
        for svc in (trainer, analyzer, extractor):
            if svc is not None:
                svc.stop()


# ---- valid requests and what they must be answered ------------------------------------------
words_st = st.lists(st.sampled_from(VOCAB), min_size=1, max_size=6, unique=True)
adapter_st = st.sampled_from(["", "tiny-a", "tiny-b"])
template_st = st.one_of(st.none(), st.builds(lambda d: epb.TemplateRef(language="en", dimension=d),
                                              st.sampled_from(EN_DIMS)))


def matrix(x: np.ndarray, dtype: str = "float64") -> cpb.Matrix:
    return wire.matrix_to_proto(np.asarray(x), dtype)


@st.composite
def inline_data(draw: st.DrawFn, min_words: int = 4, max_words: int = 10) -> apb.Representations:
    n = draw(st.integers(min_words, max_words))
    f = draw(st.integers(2, 5))
    m = draw(st.integers(0, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    words = draw(st.lists(st.sampled_from(VOCAB), min_size=n, max_size=n, unique=True))
    return apb.Representations(inline=apb.InlineRepresentations(
        words=words, feature_names=[f"f{i}" for i in range(f)], human=matrix(rng.uniform(0, 5, (n, f))),
        models=[cpb.NamedMatrix(name=f"m{j}", matrix=matrix(rng.uniform(0, 5, (n, f)))) for j in range(m)]))


def pairs(names: list[str]) -> st.SearchStrategy[list[cpb.ModelPair]]:
    if len(names) < 2:
        return st.just([])
    return st.lists(st.permutations(names).map(lambda p: cpb.ModelPair(model_a=p[0], model_b=p[1])), max_size=2)


def model_names(data: apb.Representations) -> list[str]:
    return [m.name for m in data.inline.models]


@st.composite
def rsa_options(draw: st.DrawFn, layer: bool = False) -> apb.RsaOptions:
    return apb.RsaOptions(
        distance=draw(st.sampled_from(list(wire.DISTANCE))), comparison=draw(st.sampled_from(list(wire.COMPARISON))),
        no_zscore=draw(st.booleans()), n_bootstrap=draw(st.integers(0, 12)), seed=draw(st.integers(0, 2**64 - 1)),
        n_permutations=0 if layer else draw(st.integers(0, 12)), confidence=draw(st.sampled_from([0.0, 0.9, 0.99])),
        bootstrap_mode=apb.BOOTSTRAP_MODE_INDEX if layer else draw(st.sampled_from(list(wire.BOOTSTRAP))))


@st.composite
def activation_source(draw: st.DrawFn, n_layers: int) -> apb.ActivationSource:
    variants = draw(st.sampled_from([[], [("base", "")], [("base", ""), ("tuned", "tiny-a")]]))
    return apb.ActivationSource(
        model="tiny", variants=[apb.LayerModel(name=n, adapter=a) for n, a in variants],
        layers=draw(st.lists(st.integers(0, n_layers), min_size=1, max_size=3, unique=True)),
        pooling=draw(st.sampled_from(["", *POOLINGS])))


def variants_of(source: apb.ActivationSource) -> list[tuple[str, str]]:
    return [(v.name, v.adapter) for v in source.variants] or [("base", "")]


@dataclass
class Target:
    """One RPC: its valid requests and, for each, the check its answer must pass (made before sending)."""

    service: str
    method: str
    valid: st.SearchStrategy[Message]
    expect: Callable[[Message], Check]
    fix: Callable[[Message], None] | None = None  # applied to every generated message (Submit: validate only)
    mutants: st.SearchStrategy[Message] | None = None
    prepare: Callable[[Message], None] | None = None  # state a valid request is about (a table to delete)

    @property
    def rpc(self) -> Any:
        service = SERVICES[self.service].DESCRIPTOR.services_by_name[self.service.capitalize()]
        return service.methods_by_name[self.method]

    @property
    def streaming(self) -> bool:
        return self.rpc.server_streaming


def extractor_targets(w: World) -> list[Target]:
    ref, n_layers = w.ref, w.ref.model.n_layers

    def rate_expect(req: epb.RateRequest) -> Check:
        dims = list(req.dimensions)
        templates = [ref.prompts.template("", "en", d) for d in dims]
        with ref.host.use(req.adapter or None) as manifest:
            per_dim = [rate(ref.model.model, ref.model.tokenizer, list(req.words),
                            lambda word, t=t: chat_prompt(t.render(word), ref.model.tokenizer),
                            min(req.batch_size or 64, 64), req.max_new_tokens) for t in templates]

        def check(answer: Answer) -> None:
            assert answer.code == grpc.StatusCode.OK, answer.details
            (got,) = answer.responses
            assert got.model_digest == ref.model.digest
            assert got.adapter_digest == (manifest.digest if manifest else "")
            rows = [(w_, d) for w_ in req.words for d in dims]
            assert [(r.word, r.dimension) for r in got.ratings] == rows
            for i, r in enumerate(got.ratings):
                word_i, dim_i = divmod(i, len(dims))
                expected = per_dim[dim_i]
                assert math.isclose(r.expected, expected.expected[word_i], abs_tol=1e-4)
                assert math.isclose(r.mass, expected.mass[word_i], rel_tol=1e-3, abs_tol=1e-6)
            assert [t.digest for t in got.templates] == [t.digest for t in templates]
        return check

    def extract_expect(req: epb.ExtractRequest) -> Check:
        layers = resolve_layers(list(req.layers), n_layers)
        template = req.template if req.HasField("template") else None
        want = ref.activations(list(req.words), layers, req.pooling or "last", req.adapter, template)

        def check(answer: Answer) -> None:
            assert answer.code == grpc.StatusCode.OK, answer.details
            got: dict[int, dict[int, np.ndarray]] = {k: {} for k in layers}
            for chunk in answer.responses:
                assert chunk.model_digest == ref.model.digest
                got[chunk.layer][chunk.first_word_index] = wire.matrix_from_proto(chunk.vectors, "vectors")
                assert chunk.from_cache <= len(chunk.words)
            for k in layers:
                served = np.concatenate([got[k][i] for i in sorted(got[k])])
                np.testing.assert_allclose(served, want[k], atol=1e-4, rtol=1e-4)
        return check

    def nearest_valid() -> st.SearchStrategy[epb.NearestRequest]:
        hidden = ref.model.hidden_size
        return st.builds(
            lambda layer, pooling, k, seed: epb.NearestRequest(
                model="tiny", layer=layer, pooling=pooling, k=k,
                vector=matrix(np.random.default_rng(seed).normal(size=(1, hidden)), "float32")),
            st.integers(0, n_layers), st.sampled_from(POOLINGS), st.integers(0, 12), st.integers(0, 2**32 - 1))

    def nearest_expect(req: epb.NearestRequest) -> Check:
        query = wire.matrix_from_proto(req.vector, "q")[0]

        def cosines(words: list[str]) -> np.ndarray:
            vectors = ref.activations(words, [req.layer], req.pooling, "")[req.layer]
            return vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))

        best_vocab = float(cosines(VOCAB).max())

        def check(answer: Answer) -> None:
            assert answer.code == grpc.StatusCode.OK, answer.details
            found = list(answer.responses[0].neighbours)
            assert 0 < len(found) <= (req.k or 10)
            served = [n.cosine for n in found]
            assert served == sorted(served, reverse=True)
            np.testing.assert_allclose(served, cosines([n.word for n in found]), atol=1e-4)
            assert served[0] >= best_vocab - 1e-4  # nothing nearer was skipped
        return check

    def list_adapters_expect(req: epb.ListAdaptersRequest) -> Check:
        want = sorted((m.id, m.digest) for m in AdapterStore(w.adapters).list()
                      if not req.model or m.base_model == req.model)

        def check(answer: Answer) -> None:
            assert answer.code == grpc.StatusCode.OK, answer.details
            assert sorted((a.id, a.digest) for a in answer.responses[0].adapters) == want
        return check

    def adapter_expect(unload: bool) -> Callable[[epb.AdapterRequest], Check]:
        def expect(req: epb.AdapterRequest) -> Check:
            manifest = AdapterStore(w.adapters).manifest(req.adapter)

            def check(answer: Answer) -> None:
                assert answer.code == grpc.StatusCode.OK, answer.details
                got = answer.responses[0]
                assert (got.id, got.digest, got.base_digest, got.loaded) == (
                    manifest.id, manifest.digest, manifest.base_digest, not unload)
            return check
        return expect

    return [
        Target("extractor", "ListModels", st.just(epb.ListModelsRequest()), lambda req: same_outcome(
            lambda: epb.ListModelsResponse(models=[epb.ModelInfo(name=n) for n in ref.model_names]),
            adjust=lambda exp, got: [e.MergeFrom(_loaded_fields(g)) for e, g in zip(exp.models, got.models)])),
        Target("extractor", "Rate", st.builds(
            lambda words, dims, adapter, language, mnt, bs: epb.RateRequest(
                model="tiny", words=words, dimensions=dims, adapter=adapter, language=language, max_new_tokens=mnt,
                batch_size=bs),
            words_st, st.lists(st.sampled_from(EN_DIMS), min_size=1, max_size=3, unique=True), adapter_st,
            st.sampled_from(["", "en"]), st.integers(0, 3), st.integers(0, 8)), rate_expect),
        Target("extractor", "Extract", st.builds(
            lambda words, layers, pooling, template, adapter, bs: epb.ExtractRequest(
                model="tiny", words=words, layers=layers, pooling=pooling, adapter=adapter, batch_size=bs,
                **({"template": template} if template is not None else {})),
            words_st, st.lists(st.integers(0, n_layers), min_size=1, max_size=3, unique=True),
            st.sampled_from(["", *POOLINGS]), template_st, adapter_st, st.integers(0, 8)), extract_expect),
        Target("extractor", "Nearest", nearest_valid(), nearest_expect),
        Target("extractor", "ListAdapters", st.builds(lambda m: epb.ListAdaptersRequest(model=m),
                                                      st.sampled_from(["", "tiny"])), list_adapters_expect),
        Target("extractor", "LoadAdapter", st.builds(lambda a: epb.AdapterRequest(model="tiny", adapter=a),
                                                     st.sampled_from(["tiny-a", "tiny-b"])), adapter_expect(False)),
        Target("extractor", "UnloadAdapter", st.builds(lambda a: epb.AdapterRequest(model="tiny", adapter=a),
                                                       st.sampled_from(["tiny-a", "tiny-b"])), adapter_expect(True),
               prepare=lambda req: epb_grpc.ExtractorStub(w.channels["extractor"]).LoadAdapter(req, timeout=TIMEOUT)),
    ]


def _loaded_fields(got: epb.ModelInfo) -> epb.ModelInfo:
    """What only the running service knows (whether and how a model is resident), taken as served."""
    return epb.ModelInfo(kind=got.kind, loaded=got.loaded, digest=got.digest, n_layers=got.n_layers,
                         hidden_size=got.hidden_size, device=got.device, dtype=got.dtype)


def analyzer_targets(w: World) -> list[Target]:
    limits = Limits()
    tables = TableStore(w.tables)
    scratch = TableStore(w.tables.parent.parent / "reference-tables")

    def data_of(msg: apb.Representations) -> Any:
        return wire.representations_from_proto(msg, tables.get)

    @st.composite
    def rsa_request(draw: st.DrawFn) -> apb.RsaRequest:
        data = draw(inline_data())
        features = list(data.inline.feature_names)
        sets = draw(st.lists(st.lists(st.sampled_from(features), min_size=2, max_size=len(features), unique=True),
                             max_size=2))
        return apb.RsaRequest(data=data, comparisons=draw(pairs(model_names(data))), options=draw(rsa_options()),
                              dimension_sets=[cpb.DimensionSet(name=f"s{i}", features=f) for i, f in enumerate(sets)])

    @st.composite
    def dimensions_request(draw: st.DrawFn) -> apb.DimensionsRequest:
        data = draw(inline_data())
        return apb.DimensionsRequest(data=data, comparisons=draw(pairs(model_names(data))),
                                     n_bootstrap=draw(st.integers(0, 12)), seed=draw(st.integers(0, 2**64 - 1)),
                                     confidence=draw(st.sampled_from([0.0, 0.9])))

    @st.composite
    def words_request(draw: st.DrawFn) -> apb.WordsRequest:
        data = draw(inline_data())
        return apb.WordsRequest(data=data, comparisons=draw(pairs(model_names(data))),
                                include_per_word=draw(st.booleans()))

    @st.composite
    def register_request(draw: st.DrawFn) -> apb.RegisterTableRequest:
        data = draw(inline_data()).inline
        human = wire.matrix_from_proto(data.human, "h")
        header = ",".join(["word", *data.feature_names])
        lines = [",".join([w_, *(f"{v:.6g}" for v in row)]) for w_, row in zip(data.words, human)]
        return apb.RegisterTableRequest(name=draw(st.sampled_from(TABLES)), csv="\n".join([header, *lines]).encode(),
                                        word_column=draw(st.sampled_from(["", "word"])), replace=True)

    def register_expect(req: apb.RegisterTableRequest) -> Check:
        return same_outcome(lambda: apb.TableInfo(**scratch.register(req.name, req.csv, req.word_column or None,
                                                                     req.replace)))

    def list_tables_expect(req: apb.ListTablesRequest) -> Check:
        return same_outcome(lambda: apb.ListTablesResponse(tables=[apb.TableInfo(**i) for i in tables.list()]))

    def delete_expect(req: apb.DeleteTableRequest) -> Check:
        assert any(t["name"] == req.name for t in tables.list())  # registered by ``prepare``

        def check(answer: Answer) -> None:
            assert answer.code == grpc.StatusCode.OK, answer.details
            assert all(t["name"] != req.name for t in tables.list())
        return check

    @st.composite
    def layer_rsa_request(draw: st.DrawFn) -> apb.LayerRsaRequest:
        data = draw(inline_data(max_words=8))
        source = draw(activation_source(w.ref.model.n_layers))
        names = [n for n, _ in variants_of(source)]
        return apb.LayerRsaRequest(data=data, activations=source, comparisons=draw(pairs(names)),
                                   options=draw(rsa_options(layer=True)))

    def activations(source: apb.ActivationSource, words: list[str]) -> dict[str, dict[int, np.ndarray]]:
        layers = resolve_layers(list(source.layers), w.ref.model.n_layers)
        return {name: w.ref.activations(words, layers, source.pooling or "last", adapter)
                for name, adapter in variants_of(source)}

    def layer_rsa_expect(req: apb.LayerRsaRequest) -> Check:
        def compute() -> Message:
            data = data_of(req.data)
            data.check(limits)
            acts = activations(req.activations, list(data.words))
            report = layer_rsa(data, {m: sorted(layers.items()) for m, layers in acts.items()},
                               dimension_sets=wire.dimension_sets_from_proto(req.dimension_sets),
                               comparisons=wire.pairs_from_proto(req.comparisons),
                               options=wire.rsa_options_from_proto(req.options), limits=limits)
            return wire.to_proto(report, apb.LayerRsaResponse)

        def served_from_cache(expected: Message, got: Message) -> None:
            expected.from_cache = got.from_cache  # how many vectors the extractor had cached: not a statistic
        return same_outcome(compute, tol=1e-4, adjust=served_from_cache)

    @st.composite
    def probes_request(draw: st.DrawFn) -> apb.LayerProbesRequest:
        data = draw(inline_data(min_words=8, max_words=12))
        source = draw(activation_source(w.ref.model.n_layers))
        source.layers[:] = source.layers[:2]
        features = list(data.inline.feature_names)
        return apb.LayerProbesRequest(
            data=data, activations=source,
            dimensions=draw(st.lists(st.sampled_from(features), max_size=2, unique=True)),
            options=apb.ProbeOptions(folds=draw(st.sampled_from([0, 2, 3, 4])), seed=draw(st.integers(0, 2**64 - 1)),
                                     alphas=draw(st.sampled_from([[], [0.1, 10.0]])),
                                     no_standardize=draw(st.booleans()), no_shuffled_control=draw(st.booleans())))

    def probes_expect(req: apb.LayerProbesRequest) -> Check:
        def compute() -> Message:
            data = data_of(req.data)
            data.check(limits)
            o = req.options
            options = errors.validated(ProbeOptions, folds=o.folds or 5, seed=o.seed, standardize=not o.no_standardize,
                                       shuffled_control=not o.no_shuffled_control,
                                       **({"alphas": list(o.alphas)} if o.alphas else {}))
            report = probe_models(activations(req.activations, list(data.words)), data, list(req.dimensions), options)
            return wire.to_proto(report, apb.LayerProbesResponse)
        return same_outcome(compute, tol=1e-4)

    return [
        Target("analyzer", "ComputeRsa", rsa_request(), lambda req: same_outcome(lambda: wire.to_proto(run_rsa(
            data_of(req.data), wire.dimension_sets_from_proto(req.dimension_sets),
            wire.pairs_from_proto(req.comparisons), wire.rsa_options_from_proto(req.options), limits),
            apb.RsaResponse))),
        Target("analyzer", "CompareDimensions", dimensions_request(), lambda req: same_outcome(lambda: wire.to_proto(
            stats.compare_dimensions(data_of(req.data), wire.pairs_from_proto(req.comparisons), req.n_bootstrap,
                                     req.seed, req.confidence or 0.95, limits), apb.DimensionsResponse))),
        Target("analyzer", "CompareWords", words_request(), lambda req: same_outcome(lambda: wire.to_proto(
            stats.compare_words(data_of(req.data), wire.pairs_from_proto(req.comparisons), req.include_per_word,
                                limits), apb.WordsResponse))),
        Target("analyzer", "RegisterTable", register_request(), register_expect),
        Target("analyzer", "ListTables", st.just(apb.ListTablesRequest()), list_tables_expect),
        Target("analyzer", "DeleteTable", st.builds(lambda n: apb.DeleteTableRequest(name=n), st.sampled_from(TABLES)),
               delete_expect, prepare=lambda req: apb_grpc.AnalyzerStub(w.channels["analyzer"]).RegisterTable(
                   apb.RegisterTableRequest(name=req.name, csv=b"word,f0\napple,1\nmusic,2\nkick,3\n", replace=True),
                   timeout=TIMEOUT)),
        Target("analyzer", "LayerRsa", layer_rsa_request(), layer_rsa_expect),
        Target("analyzer", "LayerProbes", probes_request(), probes_expect),
    ]


def trainer_targets(w: World) -> list[Target]:
    store = JobStore(w.jobs_db)
    runner = JobRunner(store, lambda *a, **k: None)  # never started: only its checks are used
    from sensorium.training.execute import TrainingJobs

    s = w.trainer_settings
    jobs = TrainingJobs(ModelRegistry.default(ModelStore(s.model_store), s.models), AdapterStore(s.adapters_dir),
                        s.data_dir / "jobs", s.catalog(), "cpu")

    @st.composite
    def spec_dict(draw: st.DrawFn) -> dict[str, Any]:
        return {**SPEC, "seed": draw(st.integers(0, 2**31)),
                "data": {**SPEC["data"], "dimensions": draw(st.lists(st.sampled_from(["visual", "auditory", "haptic"]),
                                                                     min_size=1, max_size=3, unique=True)),
                         "split": {**SPEC["data"]["split"], "seed": draw(st.integers(0, 1000)),
                                   "max_train_words": draw(st.integers(16, 128))}},
                "optim": {**SPEC["optim"], "max_steps": draw(st.integers(1, 200))}}

    def submit(spec_json: str, draw: st.DrawFn) -> tpb.SubmitRequest:
        return tpb.SubmitRequest(spec_json=spec_json, validate_only=True,
                                 adapter_id=draw(st.sampled_from(["", "fuzz-new"])),
                                 idempotency_key=draw(st.sampled_from(["", "k1"])))

    @st.composite
    def submit_valid(draw: st.DrawFn) -> tpb.SubmitRequest:
        return submit(json.dumps(draw(spec_dict())), draw)

    @st.composite
    def submit_mutants(draw: st.DrawFn) -> tpb.SubmitRequest:
        """Valid specs with one hostile change at the JSON level: a value, an unknown key, a duplicated key."""
        spec = draw(spec_dict())
        section = draw(st.sampled_from([spec, spec["data"], spec["optim"], spec["data"]["split"]]))
        key = draw(st.sampled_from(sorted(section)))
        how = draw(st.sampled_from(["value", "unknown", "duplicate", "drop"]))
        nasty = st.one_of(st.sampled_from([None, -1, 0, 1e309, "", "../../etc/passwd", [], {}, True, 2**70]),
                          st.text(max_size=12))
        if how == "value":
            section[key] = draw(nasty)
        elif how == "unknown":
            section[draw(st.text(min_size=1, max_size=8))] = draw(nasty)
        elif how == "drop":
            del section[key]
        text = json.dumps(spec, allow_nan=True)
        if how == "duplicate":
            text = text.replace(f'"{key}": ', f'"{key}": {json.dumps(draw(nasty))}, "{key}": ', 1)
        return submit(text, draw)

    def submit_expect(req: tpb.SubmitRequest) -> Check:
        def compute() -> Message:
            spec = errors.validated_json(TrainingSpec, req.spec_json)
            plan = jobs.plan(spec)
            return tpb.SubmitResponse(train_examples=plan.train_examples, validation_examples=plan.validation_examples,
                                      test_examples=plan.test_examples, split_digest=plan.split_digest,
                                      total_steps=plan.total_steps)
        return same_outcome(compute)

    ids = st.sampled_from(w.job_ids)

    def watch_expect(req: tpb.WatchRequest) -> Check:
        want = [as_dict(event_to_proto(e)) for e in store.events(req.id, req.after_seq)]

        def check(answer: Answer) -> None:
            assert answer.code == grpc.StatusCode.OK, answer.details
            assert [as_dict(e) for e in answer.responses] == want
        return check

    return [
        Target("trainer", "Submit", submit_valid(), submit_expect, fix=lambda m: setattr(m, "validate_only", True),
               mutants=submit_mutants()),
        Target("trainer", "GetJob", st.builds(lambda i: tpb.JobRequest(id=i), ids),
               lambda req: same_outcome(lambda: job_to_proto(store.get(req.id)))),
        Target("trainer", "ListJobs", st.builds(
            lambda states, limit: tpb.ListJobsRequest(states=states, limit=limit),
            st.lists(st.sampled_from(sorted(FROM_PROTO)), max_size=3, unique=True), st.integers(0, 5)),
            lambda req: same_outcome(lambda: tpb.ListJobsResponse(jobs=[job_to_proto(j) for j in store.list(
                [FROM_PROTO[s] for s in req.states], min(req.limit or 100, 10_000))]))),
        Target("trainer", "CancelJob", st.builds(lambda i: tpb.JobRequest(id=i), ids),
               lambda req: same_outcome(lambda: job_to_proto(runner.cancel(req.id)))),
        Target("trainer", "Watch", st.builds(lambda i, a: tpb.WatchRequest(id=i, after_seq=a), ids, st.integers(0, 12)),
               watch_expect),
    ]


ALL_RPCS = [(svc, m.name) for svc, mod in SERVICES.items()
            for m in mod.DESCRIPTOR.services_by_name[svc.capitalize()].methods]


@pytest.fixture(scope="module")
def targets(world: World) -> dict[tuple[str, str], Target]:
    found = [*extractor_targets(world), *analyzer_targets(world), *trainer_targets(world)]
    return {(t.service, t.method): t for t in found}


def test_every_rpc_has_a_fuzz_target(targets: dict[tuple[str, str], Target]) -> None:
    assert sorted(targets) == sorted(ALL_RPCS)


@pytest.mark.parametrize(("service", "method"), ALL_RPCS, ids=[f"{s}.{m}" for s, m in ALL_RPCS])
def test_fuzzed_requests_are_answered_or_refused_clearly(world: World, targets: dict[tuple[str, str], Target],
                                                         service: str, method: str) -> None:
    target = targets[(service, method)]
    rpc = target.rpc
    path = f"/{rpc.containing_service.full_name}/{rpc.name}"
    response_type = SERVICES[service].DESCRIPTOR.message_types_by_name.get(rpc.output_type.name) or \
        cpb.DESCRIPTOR.message_types_by_name[rpc.output_type.name]
    from google.protobuf.message_factory import GetMessageClass

    response_cls = GetMessageClass(response_type)
    channel, process = world.channels[service], world.process(service)
    kinds: Counter[str] = Counter()
    last_valid: list[bytes] = []
    codes: Counter[str] = Counter()
    request_ids = st.text("0123456789abcdef", min_size=8, max_size=32)

    def exchange(request: Request, request_id: str) -> None:
        payload = request.payload
        if target.fix is not None and request.message is not None:
            target.fix(request.message)
            payload = request.message.SerializeToString()
        check = None
        if request.kind == "valid":
            if target.prepare is not None:
                target.prepare(request.message)
            check = target.expect(request.message)
        answer = send(channel, path, response_cls, target.streaming, payload, TIMEOUT, (("x-request-id", request_id),))
        kinds[request.kind] += 1
        if request.kind == "valid":
            last_valid[:] = [payload]
        codes[answer.code.name] += 1
        assert process.proc.poll() is None, f"the {service} exited on a {request.kind} request"
        assert answer.code == grpc.StatusCode.OK or answer.code in REFUSALS, \
            f"{request.kind} request answered {answer.code.name}: {answer.details}"
        assert answer.code == grpc.StatusCode.OK or answer.details.strip(), f"{answer.code.name} without a message"
        if check is not None:
            check(answer)

    began = time.perf_counter()
    for kind, share in KINDS.items():
        # one run per kind, so every run sends the same mix; the drawn request id keeps hypothesis
        # from taking the repeats of a message with no fields (ListModelsRequest) as exhausted
        run = settings(max_examples=math.ceil(PER_RPC * share), deadline=None, database=None,
                       derandomize=not reliability.HEAVY, phases=(Phase.generate, Phase.shrink),
                       suppress_health_check=list(HealthCheck))(
            given(request=requests(kind, rpc.input_type, target.valid, target.mutants), request_id=request_ids)(
                exchange))
        run()
    total = sum(kinds.values())
    assert total >= PER_RPC and kinds["valid"] >= 0.2 * total, dict(kinds)
    after = send(channel, path, response_cls, target.streaming, last_valid[0], TIMEOUT)  # still serving
    assert after.code == grpc.StatusCode.OK or after.code in REFUSALS and after.details, after
    reliability.record("fuzz", f"{service}.{method}", {
        "requests": total, **{f"kind_{k}": v for k, v in kinds.items()}, "codes": dict(codes),
        "seconds": round(time.perf_counter() - began, 1)})
