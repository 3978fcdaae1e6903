"""gRPC glue of the analyzer: decode the request, run the library in a worker thread, encode.

Analyses take seconds of CPU; they run off the event loop so that health checks and other
calls keep being answered, and a bounded queue refuses work beyond ``max_queued``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import grpc

from sensorium import stats, wire
from sensorium.representations import Representations
from sensorium.rsa import run_rsa
from sensorium.tables import TableStore
from sensorium.v1 import analyzer_pb2 as apb
from sensorium.v1 import analyzer_pb2_grpc as apb_grpc
from services.analyzer.settings import AnalyzerSettings
from services.common.workers import WorkSlots

T = TypeVar("T")


class AnalyzerServicer(apb_grpc.AnalyzerServicer):
    def __init__(self, settings: AnalyzerSettings) -> None:
        self.settings = settings
        self.limits = settings.limits()
        self.tables = TableStore(settings.data_dir / "tables", settings.max_table_bytes)
        self.slots = WorkSlots("analyzer", settings.workers, settings.max_queued)

    async def _compute(self, fn: Callable[[], T]) -> T:
        async with self.slots.slot():
            return await asyncio.to_thread(fn)

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
