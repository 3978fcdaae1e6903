"""gRPC glue of the extractor: check the request, run the model in a worker thread, encode.

Forward passes take from milliseconds to minutes; they run off the event loop so that health
checks and ListModels keep being answered while a model computes. Models load on first use
(or at startup for ``preload``) and then stay resident, one per name: loading takes seconds and
a converted GGUF tens of seconds, far more than any single request should pay twice. Adapters
are applied on the resident model per request; a request's computation holds the model's
adapter lock so that no other request switches the adapter under it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import json
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np

from sensorium import wire
from sensorium.activations import POOLINGS, iter_activations, resolve_layers
from sensorium.cache import Space, VectorCache
from sensorium.errors import Cancelled, InvalidArgument, NotFound, ResourceExhausted, StorageFull, StorageReadOnly
from sensorium.models.adapters import AdapterHost, AdapterManifest, AdapterStore, check_adapter_id
from sensorium.models.store import LoadedModel, ModelRegistry, ModelStore
from sensorium.prompts import available, chat_prompt
from sensorium.prompts.sets import PromptSets
from sensorium.prompts.template import PromptTemplate
from sensorium.ratings import Ratings, rate
from sensorium.v1 import extractor_pb2 as epb
from sensorium.v1 import extractor_pb2_grpc as epb_grpc
from services.common.workers import WorkSlots, in_thread
from services.extractor.settings import ExtractorSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_LANGUAGE = "en"
DEFAULT_POOLING = "last"
DEFAULT_K = 10


class Models:
    """The registry's models, each loaded at most once and kept resident with its adapters."""

    def __init__(self, registry: ModelRegistry, adapters: AdapterStore, max_loaded_adapters: int) -> None:
        self.registry = registry
        self.adapters = adapters
        self.max_loaded_adapters = max_loaded_adapters
        self._loaded: dict[str, Resident] = {}
        self._locks: dict[str, threading.Lock] = {name: threading.Lock() for name in registry.names()}

    def loaded(self, name: str) -> Resident | None:
        return self._loaded.get(name)

    def get(self, name: str) -> Resident:
        """Blocking: call from a worker thread. Concurrent first uses wait for one load."""
        self.registry.spec(name)  # NotFound for an unknown name, before any lock
        if (resident := self._loaded.get(name)) is not None:
            return resident
        with self._locks[name]:
            if (resident := self._loaded.get(name)) is None:
                started = time.monotonic()
                model = self.registry.load(name)
                host = AdapterHost(model.model, name, model.digest, self.adapters, self.max_loaded_adapters)
                resident = self._loaded[name] = Resident(model, host)
                seconds = round(time.monotonic() - started, 3)
                logger.info("model loaded", extra={"model": name, "digest": model.digest, "device": model.device,
                                                   "dtype": model.dtype, "seconds": seconds})
        return resident


@dataclass(frozen=True)
class Resident:
    """A loaded model and the adapters on it; every computation goes through ``host.use``."""

    model: LoadedModel
    host: AdapterHost

    def adapter_digest(self, adapter: str) -> str:
        """The cache-key part for ``adapter`` ("" for the base model), checked against the base."""
        return self.host.check(check_adapter_id(adapter)).digest if adapter else ""


def check_words(words: Sequence[str], settings: ExtractorSettings) -> list[str]:
    """Words become cache keys and prompt text: reject what would be ambiguous or unprintable."""
    words = list(words)
    if not words:
        raise InvalidArgument("no words given")
    if len(words) > settings.max_words:
        raise ResourceExhausted(f"{len(words)} words in one request; the limit is max_words={settings.max_words}")
    seen: set[str] = set()
    for i, word in enumerate(words):
        if not word.strip():
            raise InvalidArgument(f"word {i} is empty or blank")
        if len(word) > settings.max_word_length:
            raise InvalidArgument(f"word {i} ({word[:16]!r}...) has {len(word)} characters; "
                                  f"the limit is max_word_length={settings.max_word_length}")
        if any(unicodedata.category(c) == "Cc" for c in word):
            raise InvalidArgument(f"word {i} ({word!r}) contains control characters")
        if word in seen:
            raise InvalidArgument(f"word {word!r} occurs more than once; each word is one row of the result")
        seen.add(word)
    return words


def check_pooling(pooling: str) -> str:
    pooling = pooling or DEFAULT_POOLING
    if pooling not in POOLINGS:
        raise InvalidArgument(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    return pooling


def template_of(ref: epb.TemplateRef | None, prompts: PromptSets) -> PromptTemplate | None:
    if ref is None:
        return None
    if not ref.dimension:
        raise InvalidArgument("a template needs a dimension")
    return prompts.template(ref.prompts, ref.language or DEFAULT_LANGUAGE, ref.dimension)


def renderer(template: PromptTemplate | None, tokenizer: object) -> Callable[[str], str] | None:
    """The text the model reads for a word: the same chat-formatted prompt the ratings use."""
    if template is None:
        return None
    return lambda word: chat_prompt(template.render(word), tokenizer)


class ExtractorServicer(epb_grpc.ExtractorServicer):
    def __init__(self, settings: ExtractorSettings) -> None:
        self.settings = settings
        store = ModelStore(settings.model_store)
        self.models = Models(ModelRegistry.default(store, settings.models), AdapterStore(settings.adapters_dir),
                             settings.max_loaded_adapters)
        self.cache = VectorCache(settings.vector_cache, settings.cache_max_vectors)
        self.slots = WorkSlots("extractor", settings.workers, settings.max_queued)
        self.prompts = PromptSets(settings.prompt_sets)

    async def ready(self) -> None:
        for name in self.settings.preload:
            await asyncio.to_thread(self.models.get, name)

    def _batch_size(self, requested: int) -> int:
        # A batch size only trades memory for speed, never changes a result: cap it, don't refuse.
        return min(requested or self.settings.max_batch_size, self.settings.max_batch_size)

    def _model(self, name: str) -> Awaitable[Resident]:
        return in_thread(lambda _: self.models.get(name))

    def _flush(self) -> None:
        """Save the vector cache; a failure is logged as a warning, never made the request's error.

        Why: when an Extract flushes, its vectors are computed and streamed, and they are correct
        whether or not the disk takes them. The cache keeps them in memory, still marked unsaved,
        so the next flush retries, and the files on disk stay the previous, intact state. Failing
        the RPC would throw correct work away over a problem (a full or read-only disk) only the
        operator can fix: the warning and ``cache.stats.failed_flushes`` are for the operator.
        """
        try:
            self.cache.flush()
        except (StorageFull, StorageReadOnly, OSError) as exc:
            logger.warning("vector cache not saved; serving from memory and retrying at the next flush: %s", exc,
                           extra={"failed_flushes": self.cache.stats.failed_flushes})

    async def ListModels(self, request: epb.ListModelsRequest, context) -> epb.ListModelsResponse:
        out = []
        for name in self.models.registry.names():
            info = epb.ModelInfo(name=name, kind=self.models.registry.spec(name).kind)
            if (resident := self.models.loaded(name)) is not None:
                m = resident.model
                info.loaded = True
                info.digest, info.n_layers, info.hidden_size = m.digest, m.n_layers, m.hidden_size
                info.device, info.dtype = m.device, m.dtype
            out.append(info)
        return epb.ListModelsResponse(models=out)

    async def Rate(self, request: epb.RateRequest, context) -> epb.RateResponse:
        words = check_words(request.words, self.settings)
        language = request.language or DEFAULT_LANGUAGE
        dimensions = list(dict.fromkeys(d.strip().casefold() for d in request.dimensions))
        if not dimensions and request.prompts:
            dimensions = self.prompts.dimensions(request.prompts, language)
        if not dimensions:
            builtin = available()
            if language.strip().casefold() not in builtin:
                raise NotFound(f"no built-in prompt templates for language {language!r}; "
                               f"available: {', '.join(builtin)}")
            dimensions = list(builtin[language.strip().casefold()])
        templates = [self.prompts.template(request.prompts, language, d) for d in dimensions]  # NotFound: unknown
        if request.max_new_tokens > self.settings.max_answer_tokens:
            raise ResourceExhausted(f"max_new_tokens={request.max_new_tokens} is over the limit "
                                    f"max_answer_tokens={self.settings.max_answer_tokens}")
        self.models.registry.spec(request.model)
        batch_size = self._batch_size(request.batch_size)
        async with self.slots.slot():
            resident = await self._model(request.model)
            model = resident.model
            started = time.monotonic()

            def work(cancel: threading.Event) -> tuple[list[Ratings], AdapterManifest | None]:
                with resident.host.use(request.adapter or None) as adapter:
                    out = []
                    for i, t in enumerate(templates):
                        try:
                            out.append(rate(model.model, model.tokenizer, words, renderer(t, model.tokenizer),
                                            batch_size, request.max_new_tokens, cancel=cancel))
                        except Cancelled as exc:  # how far the whole request got, not this dimension alone
                            raise Cancelled.after(i * len(words) + exc.done, len(templates) * len(words),
                                                  "ratings") from None
                    return out, adapter

            per_dimension, adapter = await in_thread(work)
        logger.info("rated", extra={"model": model.name, "adapter": request.adapter, "words": len(words),
                                    "dimensions": len(templates), "seconds": round(time.monotonic() - started, 3)})
        ratings = []
        for i, word in enumerate(words):
            for template, r in zip(templates, per_dimension):
                rating = epb.WordRating(word=word, dimension=template.dimension, expected=float(r.expected[i]),
                                        mass=float(r.mass[i]), answer=r.answers[i],
                                        prefix_reused=bool(r.prefix_reused[i]))
                if r.parsed[i] is not None:
                    rating.parsed = float(r.parsed[i])
                ratings.append(rating)
        return epb.RateResponse(
            model=model.name, model_digest=model.digest, language=templates[0].language if templates else language,
            ratings=ratings, templates=[epb.TemplateDigest(dimension=t.dimension, digest=t.digest) for t in templates],
            adapter=request.adapter, adapter_digest=adapter.digest if adapter is not None else "")

    def _rows_per_chunk(self, width: int) -> int:
        """Rows that fit comfortably in one message: half the limit, words and framing included."""
        per_row = width * 4 + self.settings.max_word_length * 4 + 16
        return max(1, (self.settings.max_message_bytes // 2) // per_row)

    async def Extract(self, request: epb.ExtractRequest, context) -> AsyncIterator[epb.ExtractChunk]:
        words = check_words(request.words, self.settings)
        pooling = check_pooling(request.pooling)
        template = template_of(request.template if request.HasField("template") else None, self.prompts)
        self.models.registry.spec(request.model)
        batch_size = self._batch_size(request.batch_size)
        async with self.slots.slot():
            resident = await self._model(request.model)
            model = resident.model
            layers = resolve_layers([*request.layers, *(float(d) for d in request.relative_depths)], model.n_layers)
            digest = template.digest if template is not None else ""
            adapter = await asyncio.to_thread(resident.adapter_digest, request.adapter)
            spaces = {k: Space(model=model.digest, adapter=adapter, template=digest, pooling=pooling, layer=k)
                      for k in layers}
            render = renderer(template, model.tokenizer)
            rows = min(batch_size, self._rows_per_chunk(model.hidden_size))
            started, hits, misses = time.monotonic(), 0, 0

            def batch(chunk: list[str], cancel: threading.Event) -> tuple[dict[int, np.ndarray], dict[int, int]]:
                """Vectors of ``chunk`` per layer, from the cache where possible, and the hits per layer."""
                found = {k: self.cache.get_many(spaces[k], chunk) for k in layers}
                missing = [w for w in chunk if any(w not in found[k][0] for k in layers)]
                computed: dict[int, dict[str, np.ndarray]] = {k: {} for k in layers}
                if missing:
                    with resident.host.use(request.adapter or None):
                        for first, by_layer in iter_activations(model.model, model.tokenizer, missing, layers,
                                                                pooling, render, batch_size, cancel):
                            names = missing[first:first + len(next(iter(by_layer.values())))]
                            for k, vectors in by_layer.items():
                                self.cache.put_many(spaces[k], names, vectors)
                                computed[k].update(zip(names, vectors))
                out = {k: np.stack([found[k][0].get(w, computed[k].get(w)) for w in chunk]).astype(np.float32)
                       for k in layers}
                return out, {k: len(found[k][0]) for k in layers}

            completed = False
            try:
                for first in range(0, len(words), rows):
                    chunk = words[first:first + rows]
                    vectors, from_cache = await in_thread(lambda cancel, chunk=chunk: batch(chunk, cancel))
                    for k in layers:
                        hits += from_cache[k]
                        misses += len(chunk) - from_cache[k]
                        yield epb.ExtractChunk(layer=k, first_word_index=first, words=chunk,
                                               vectors=wire.matrix_to_proto(vectors[k], "float32"),
                                               from_cache=from_cache[k], template_digest=digest,
                                               model_digest=model.digest, adapter_digest=adapter)
                completed = True
            finally:
                # a dropped stream stops at a chunk boundary; what it computed is cached all the same
                await in_thread(lambda _: self._flush())
                logger.info("extracted", extra={
                    "model": model.name, "adapter": request.adapter, "words": len(words), "layers": layers,
                    "pooling": pooling, "template": digest, "cache_hits": hits, "cache_misses": misses,
                    "completed": completed,
                    "seconds": round(time.monotonic() - started, 3)})

    async def Nearest(self, request: epb.NearestRequest, context) -> epb.NearestResponse:
        pooling = check_pooling(request.pooling)
        template = template_of(request.template if request.HasField("template") else None, self.prompts)
        query_kind = request.WhichOneof("query")
        if query_kind is None:
            raise InvalidArgument("give a word or a vector to search from")
        resident = await self._model(request.model)
        (layer,) = resolve_layers([request.layer], resident.model.n_layers)
        adapter = await asyncio.to_thread(resident.adapter_digest, request.adapter)
        space = Space(model=resident.model.digest, adapter=adapter,
                      template=template.digest if template is not None else "", pooling=pooling, layer=layer)
        if query_kind == "word":
            query: str | np.ndarray = request.word
        else:
            query = wire.matrix_from_proto(request.vector, "vector")
            if query.shape[0] != 1:
                raise InvalidArgument(f"the query vector must be one row, got {query.shape[0]}")
        found = await asyncio.to_thread(self.cache.nearest, space, query, request.k or DEFAULT_K)
        return epb.NearestResponse(neighbours=[epb.Neighbour(word=w, cosine=c) for w, c in found])

    # ---- adapters ------------------------------------------------------------------------------

    def _info(self, manifest: AdapterManifest) -> epb.AdapterInfo:
        resident = self.models.loaded(manifest.base_model)
        loaded = resident is not None and resident.host.is_loaded(manifest.id)
        return epb.AdapterInfo(id=manifest.id, base_model=manifest.base_model, base_digest=manifest.base_digest,
                               digest=manifest.digest, created=manifest.created, loaded=loaded,
                               training_json=json.dumps(manifest.training, sort_keys=True))

    async def ListAdapters(self, request: epb.ListAdaptersRequest, context) -> epb.ListAdaptersResponse:
        if request.model:
            self.models.registry.spec(request.model)
        found = await asyncio.to_thread(self.models.adapters.list)
        return epb.ListAdaptersResponse(adapters=[self._info(m) for m in found
                                                  if not request.model or m.base_model == request.model])

    def _adapter_request(self, request: epb.AdapterRequest) -> str:
        if not request.adapter:
            raise InvalidArgument("no adapter named")
        self.models.registry.spec(request.model)
        return check_adapter_id(request.adapter)

    async def LoadAdapter(self, request: epb.AdapterRequest, context) -> epb.AdapterInfo:
        adapter = self._adapter_request(request)
        async with self.slots.slot():
            resident = await self._model(request.model)
            manifest = await in_thread(lambda _: resident.host.load(adapter))
        return self._info(manifest)

    async def UnloadAdapter(self, request: epb.AdapterRequest, context) -> epb.AdapterInfo:
        adapter = self._adapter_request(request)
        resident = self.models.loaded(request.model)
        if resident is None:
            raise NotFound(f"model {request.model!r} is not loaded, so no adapter is loaded on it")
        manifest = await asyncio.to_thread(resident.host.unload, adapter)
        return self._info(manifest)


def build(settings: ExtractorSettings) -> tuple[Callable[[grpc.aio.Server], list[str]], Callable[[], Awaitable[None]]]:
    """The servicer's registration and its readiness step, sharing one servicer."""
    servicer: list[ExtractorServicer] = []

    def add(server: grpc.aio.Server) -> list[str]:
        servicer.append(ExtractorServicer(settings))
        epb_grpc.add_ExtractorServicer_to_server(servicer[0], server)
        return [epb.DESCRIPTOR.services_by_name["Extractor"].full_name]

    async def ready() -> None:
        await servicer[0].ready()

    return add, ready
