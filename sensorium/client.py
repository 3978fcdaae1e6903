"""Typed client of the Sensorium services: library types in, library types out.

``AnalyzerClient(address).rsa(reps, ...)`` returns the same ``RsaReport`` that
``sensorium.rsa.run_rsa`` returns in-process, so a pipeline can switch between the two freely.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from sensorium import wire
from sensorium.representations import Representations
from sensorium.rsa.analysis import DimensionSet, RsaOptions, RsaReport
from sensorium.stats import DimensionsReport, WordsReport
from sensorium.v1 import analyzer_pb2 as apb
from sensorium.v1 import analyzer_pb2_grpc as apb_grpc
from sensorium.v1 import common_pb2 as cpb

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


def open_channel(address: str, *, tls_ca_file: str | Path | None = None, tls: bool = False,
                 client_cert_file: str | Path | None = None, client_key_file: str | Path | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.Channel:
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes)]
    if tls or tls_ca_file:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(read(tls_ca_file), read(client_key_file), read(client_cert_file))
        return grpc.secure_channel(address, creds, options)
    return grpc.insecure_channel(address, options)


class _Base:
    def __init__(self, address: str | grpc.Channel, token: str | None = None, timeout: float | None = 600.0,
                 **channel_options) -> None:
        self.channel = address if isinstance(address, grpc.Channel) else open_channel(address, **channel_options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Data = Representations | apb.Representations


def _data(reps: Data) -> apb.Representations:
    return reps if isinstance(reps, apb.Representations) else wire.representations_to_proto(reps)


def _pairs(comparisons: list[tuple[str, str]] | None) -> list[cpb.ModelPair]:
    return [cpb.ModelPair(model_a=a, model_b=b) for a, b in comparisons or []]


def table_data(table: str, human_columns: list[str], models: dict[str, list[str]],
               sd_columns: list[str] | None = None, n_columns: list[str] | None = None) -> apb.Representations:
    """Refer to columns of a table registered with the analyzer instead of sending matrices."""
    return apb.Representations(table=apb.TableRepresentations(
        table=table, human_columns=human_columns,
        models=[apb.ModelColumns(name=k, columns=v) for k, v in models.items()],
        human_sd_columns=sd_columns or [], human_n_columns=n_columns or []))


class AnalyzerClient(_Base):
    def __init__(self, address: str | grpc.Channel, token: str | None = None, timeout: float | None = 600.0,
                 **channel_options) -> None:
        super().__init__(address, token, timeout, **channel_options)
        self.stub = apb_grpc.AnalyzerStub(self.channel)

    def _call(self, method, request):
        return method(request, metadata=self.metadata, timeout=self.timeout)

    def rsa(self, reps: Data, dimension_sets: list[DimensionSet] | None = None,
            comparisons: list[tuple[str, str]] | None = None, options: RsaOptions | None = None) -> RsaReport:
        request = apb.RsaRequest(
            data=_data(reps),
            dimension_sets=[cpb.DimensionSet(name=s.name, features=s.features) for s in dimension_sets or []],
            comparisons=_pairs(comparisons),
            options=wire.rsa_options_to_proto(options or RsaOptions()),
        )
        return wire.from_proto(self._call(self.stub.ComputeRsa, request), RsaReport)

    def dimensions(self, reps: Data, comparisons: list[tuple[str, str]] | None = None,
                   n_bootstrap: int = 0, seed: int = 0, confidence: float = 0.95) -> DimensionsReport:
        request = apb.DimensionsRequest(
            data=_data(reps),
            comparisons=_pairs(comparisons),
            n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
        return wire.from_proto(self._call(self.stub.CompareDimensions, request), DimensionsReport)

    def words(self, reps: Data, comparisons: list[tuple[str, str]] | None = None,
              include_per_word: bool = False) -> WordsReport:
        request = apb.WordsRequest(
            data=_data(reps),
            comparisons=_pairs(comparisons),
            include_per_word=include_per_word)
        return wire.from_proto(self._call(self.stub.CompareWords, request), WordsReport)

    def register_table(self, name: str, csv: bytes, word_column: str = "", replace: bool = False) -> apb.TableInfo:
        return self._call(self.stub.RegisterTable, apb.RegisterTableRequest(
            name=name, csv=csv, word_column=word_column, replace=replace))

    def list_tables(self) -> list[apb.TableInfo]:
        return list(self._call(self.stub.ListTables, apb.ListTablesRequest()).tables)

    def delete_table(self, name: str) -> None:
        self._call(self.stub.DeleteTable, apb.DeleteTableRequest(name=name))
