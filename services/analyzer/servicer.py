"""gRPC glue of the analyzer: decode the request, run the library in a worker thread, encode.

Analyses take seconds of CPU; they run off the event loop so that health checks and other
calls keep being answered, and a bounded queue refuses work beyond ``max_queued``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from sensorium import errors, stats, wire
from sensorium.client import ExtractorClient
from sensorium.probes import ProbeOptions, probe_models
from sensorium.representations import Representations, check_limit
from sensorium.rsa import run_rsa
from sensorium.rsa.layers import layer_rsa
from sensorium.tables import TableStore
from sensorium.v1 import analyzer_pb2 as apb
from sensorium.v1 import analyzer_pb2_grpc as apb_grpc
from services.analyzer.settings import AnalyzerSettings
from services.common.workers import WorkSlots

T = TypeVar("T")
logger = logging.getLogger(__name__)

# what an extractor's refusal becomes here: its own status where the caller's request is at
# fault, FAILED_PRECONDITION where this analyzer's credentials for it are
_EXTRACTOR_ERRORS: dict[grpc.StatusCode, type[errors.SensoriumError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: errors.FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: errors.FailedPrecondition,
}


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on ``time.monotonic()``'s clock, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _activation_variants(source: apb.ActivationSource) -> list[tuple[str, str]]:
    """(label, adapter) of each variant; the base model alone when none are named."""
    variants = [(v.name.strip(), v.adapter) for v in source.variants] or [("base", "")]
    labels = [name for name, _ in variants]
    if any(not name for name in labels):
        raise errors.InvalidArgument("activations.variants: every variant needs a name")
    if len(set(labels)) != len(labels):
        raise errors.InvalidArgument(f"activations.variants: duplicate names in {labels}")
    if not source.model:
        raise errors.InvalidArgument("activations.model: name the extractor's model")
    return variants


class AnalyzerServicer(apb_grpc.AnalyzerServicer):
    def __init__(self, settings: AnalyzerSettings) -> None:
        self.settings = settings
        self.limits = settings.limits()
        self.tables = TableStore(settings.data_dir / "tables", settings.max_table_bytes)
        self.slots = WorkSlots("analyzer", settings.workers, settings.max_queued)
        self.extractor: ExtractorClient | None = None
        if settings.extractor_address:
            token = settings.extractor_token.get_secret_value() if settings.extractor_token else None
            self.extractor = ExtractorClient(settings.extractor_address, token=token,
                                             tls_ca_file=settings.extractor_tls_ca_file,
                                             client_cert_file=settings.extractor_tls_cert_file,
                                             client_key_file=settings.extractor_tls_key_file,
                                             max_message_bytes=settings.max_message_bytes,
                                             timeout=settings.extractor_timeout_seconds)

    def _extractor_timeout(self, deadline: float | None) -> tuple[float, str]:
        """Seconds one extractor call may take, and what bounds it: the setting or the caller's deadline.

        Without a bound a hung extractor would hold the analysis (and its worker) forever; with the
        caller's deadline, nothing is computed for a caller that has already given up.
        """
        timeout = self.settings.extractor_timeout_seconds
        if deadline is not None and deadline - time.monotonic() < timeout:
            return max(0.0, deadline - time.monotonic()), "the caller's deadline"
        return timeout, f"extractor_timeout_seconds={timeout:g}"

    def _activations(self, source: apb.ActivationSource, words: tuple[str, ...],
                     template: Any, deadline: float | None = None) -> tuple[dict[str, dict[int, np.ndarray]], int]:
        """Every variant's layers for ``words``, read through the extractor (and its cache).

        ``deadline`` (``time.monotonic()``) is the caller's: each extractor call ends by then at the latest.
        """
        if self.extractor is None:
            raise errors.FailedPrecondition("this analyzer has no extractor_address configured: layer analyses "
                                            "read activations from an extractor")
        variants = _activation_variants(source)
        check_limit(len(variants), self.limits.max_models, "variants", "max_models")
        out: dict[str, dict[int, np.ndarray]] = {}
        cached = 0
        for name, adapter in variants:
            timeout, bound = self._extractor_timeout(deadline)
            try:
                acts = self.extractor.extract(source.model, list(words), layers=list(source.layers),
                                              pooling=source.pooling or "last", adapter=adapter,
                                              template=(template.language, template.dimension) if template else None,
                                              timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    logger.warning("extractor call timed out", extra={
                        "variant": name, "timeout_seconds": round(timeout, 3), "bound": bound})
                    raise errors.Unavailable(f"extractor ({name}) did not answer within {timeout:.1f} s ({bound})") \
                        from None
                kind = _EXTRACTOR_ERRORS.get(exc.code(), errors.Unavailable)
                raise kind(f"extractor ({name}): {exc.details() or exc.code().name}") from None
            out[name] = acts.layers
            cached += acts.from_cache
        return out, cached

    async def _compute(self, fn: Callable[[], T]) -> T:
        # the slot is held until the thread ends, even when the caller has gone (see ``in_thread``)
        return await self.slots.run(lambda _: fn())

    def _data(self, msg: apb.Representations) -> Representations:
        return wire.representations_from_proto(msg, self.tables.get)

    async def ComputeRsa(self, request: apb.RsaRequest, context: grpc.aio.ServicerContext) -> apb.RsaResponse:
        def work():
            report = run_rsa(self._data(request.data), wire.dimension_sets_from_proto(request.dimension_sets),
                             wire.pairs_from_proto(request.comparisons),
                             wire.rsa_options_from_proto(request.options), self.limits)
            return wire.to_proto(report, apb.RsaResponse)
        return await self._compute(work)

    async def CompareDimensions(self, request: apb.DimensionsRequest, context) -> apb.DimensionsResponse:
        def work():
            report = stats.compare_dimensions(self._data(request.data), wire.pairs_from_proto(request.comparisons),
                                              request.n_bootstrap, request.seed, request.confidence or 0.95,
                                              self.limits)
            return wire.to_proto(report, apb.DimensionsResponse)
        return await self._compute(work)

    async def CompareWords(self, request: apb.WordsRequest, context) -> apb.WordsResponse:
        def work():
            report = stats.compare_words(self._data(request.data), wire.pairs_from_proto(request.comparisons),
                                         request.include_per_word, self.limits)
            return wire.to_proto(report, apb.WordsResponse)
        return await self._compute(work)

    async def LayerRsa(self, request: apb.LayerRsaRequest, context) -> apb.LayerRsaResponse:
        deadline = _deadline(context)

        def work():
            data = self._data(request.data)
            data.check(self.limits)
            source = request.activations
            template = source.template if source.HasField("template") else None
            acts, cached = self._activations(source, data.words, template, deadline)
            report = layer_rsa(data, {m: sorted(layers.items()) for m, layers in acts.items()},
                               dimension_sets=wire.dimension_sets_from_proto(request.dimension_sets),
                               comparisons=wire.pairs_from_proto(request.comparisons),
                               options=wire.rsa_options_from_proto(request.options), limits=self.limits)
            return wire.to_proto(report.model_copy(update={"from_cache": cached}), apb.LayerRsaResponse)
        return await self._compute(work)

    async def LayerProbes(self, request: apb.LayerProbesRequest, context) -> apb.LayerProbesResponse:
        deadline = _deadline(context)

        def work():
            data = self._data(request.data)
            data.check(self.limits)
            o = request.options
            options = errors.validated(ProbeOptions, folds=o.folds or 5, seed=o.seed,
                                       standardize=not o.no_standardize, shuffled_control=not o.no_shuffled_control,
                                       **({"alphas": list(o.alphas)} if o.alphas else {}))
            source = request.activations
            acts, _ = self._activations(source, data.words, source.template if source.HasField("template") else None,
                                        deadline)
            transfer = None
            if request.HasField("transfer"):
                other = self._data(request.transfer)
                other.check(self.limits)
                template = request.transfer_template if request.HasField("transfer_template") else None
                transfer = (other, self._activations(source, other.words, template, deadline)[0])
            report = probe_models(acts, data, list(request.dimensions), options, transfer)
            return wire.to_proto(report, apb.LayerProbesResponse)
        return await self._compute(work)

    async def RegisterTable(self, request: apb.RegisterTableRequest, context) -> apb.TableInfo:
        info = await self._compute(lambda: self.tables.register(request.name, request.csv,
                                                                request.word_column or None, request.replace))
        return apb.TableInfo(**info)

    async def ListTables(self, request: apb.ListTablesRequest, context) -> apb.ListTablesResponse:
        return apb.ListTablesResponse(tables=[apb.TableInfo(**i) for i in self.tables.list()])

    async def DeleteTable(self, request: apb.DeleteTableRequest, context) -> apb.DeleteTableResponse:
        self.tables.delete(request.name)
        return apb.DeleteTableResponse()


def add_servicers(settings: AnalyzerSettings) -> Callable[[grpc.aio.Server], list[str]]:
    def add(server: grpc.aio.Server) -> list[str]:
        apb_grpc.add_AnalyzerServicer_to_server(AnalyzerServicer(settings), server)
        return [apb.DESCRIPTOR.services_by_name["Analyzer"].full_name]
    return add
