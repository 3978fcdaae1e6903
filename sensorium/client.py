"""Typed client of the Sensorium services: library types in, library types out.

``AnalyzerClient(address).rsa(reps, ...)`` returns the same ``RsaReport`` that
``sensorium.rsa.run_rsa`` returns in-process, so a pipeline can switch between the two freely.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from sensorium import wire
from sensorium.representations import Representations
from sensorium.probes import ProbeOptions, ProbesReport
from sensorium.rsa.analysis import DimensionSet, RsaOptions, RsaReport
from sensorium.rsa.layers import LayerRsaReport
from sensorium.stats import DimensionsReport, WordsReport
from sensorium.v1 import analyzer_pb2 as apb
from sensorium.v1 import analyzer_pb2_grpc as apb_grpc
from sensorium.v1 import common_pb2 as cpb
from sensorium.v1 import extractor_pb2 as epb

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20

#: gRPC's own retry of calls that found the service unavailable (restarting, briefly unreachable):
#: up to 5 attempts with exponential backoff (0.5 s, 1 s, 2 s, 4 s, jittered by gRPC), on every
#: method. A call the service has started answering is never repeated, so nothing runs twice.
RETRY_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.5s", "maxBackoff": "8s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def open_channel(address: str, *, tls_ca_file: str | Path | None = None, tls: bool = False,
                 client_cert_file: str | Path | None = None, client_key_file: str | Path | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retry: bool = True) -> grpc.Channel:
    """A channel to ``address``: TLS when ``tls``, a CA or a client certificate is given, else plaintext.

    ``tls_ca_file`` is the CA that signed the server's certificate (default: the system's roots);
    ``client_cert_file`` and ``client_key_file`` are this client's certificate for mutual TLS. A
    client given a certificate always speaks TLS: it never falls back to plaintext unnoticed.
    """
    if (client_cert_file is None) != (client_key_file is None):
        raise ValueError("client_cert_file and client_key_file must be given together")
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes)]
    if retry:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]
    if tls or tls_ca_file or client_cert_file:
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


def _source(model: str, variants: dict[str, str] | None, layers: list[int] | None, pooling: str,
            template: tuple[str, str] | None) -> apb.ActivationSource:
    source = apb.ActivationSource(model=model, layers=layers or [], pooling=pooling, variants=[
        apb.LayerModel(name=name, adapter=adapter) for name, adapter in (variants or {}).items()])
    if template is not None:
        source.template.CopyFrom(epb.TemplateRef(language=template[0], dimension=template[1]))
    return source


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

    def layer_rsa(self, reps: Data, model: str, variants: dict[str, str] | None = None, *,
                  layers: list[int] | None = None, pooling: str = "last", template: tuple[str, str] | None = None,
                  dimension_sets: list[DimensionSet] | None = None, comparisons: list[tuple[str, str]] | None = None,
                  options: RsaOptions | None = None) -> LayerRsaReport:
        """Layer-wise RSA of ``model`` read through the analyzer's extractor.

        ``variants`` maps a label to an adapter id ("" for the base model); default: the base as "base".
        """
        request = apb.LayerRsaRequest(
            data=_data(reps), activations=_source(model, variants, layers, pooling, template),
            dimension_sets=[cpb.DimensionSet(name=s.name, features=s.features) for s in dimension_sets or []],
            comparisons=_pairs(comparisons), options=wire.rsa_options_to_proto(options or RsaOptions()))
        return wire.from_proto(self._call(self.stub.LayerRsa, request), LayerRsaReport)

    def layer_probes(self, reps: Data, model: str, variants: dict[str, str] | None = None, *,
                     layers: list[int] | None = None, pooling: str = "last", template: tuple[str, str] | None = None,
                     dimensions: list[str] | None = None, options: ProbeOptions | None = None,
                     transfer: Data | None = None, transfer_template: tuple[str, str] | None = None) -> ProbesReport:
        """Cross-validated ridge probes per layer and dimension; ``transfer``: another language's aligned words."""
        o = options or ProbeOptions()
        request = apb.LayerProbesRequest(
            data=_data(reps), activations=_source(model, variants, layers, pooling, template),
            dimensions=dimensions or [],
            options=apb.ProbeOptions(folds=o.folds, alphas=o.alphas, seed=o.seed, no_standardize=not o.standardize,
                                     no_shuffled_control=not o.shuffled_control))
        if transfer is not None:
            request.transfer.CopyFrom(_data(transfer))
        if transfer_template is not None:
            request.transfer_template.CopyFrom(epb.TemplateRef(language=transfer_template[0],
                                                               dimension=transfer_template[1]))
        return wire.from_proto(self._call(self.stub.LayerProbes, request), ProbesReport)

    def register_table(self, name: str, csv: bytes, word_column: str = "", replace: bool = False) -> apb.TableInfo:
        return self._call(self.stub.RegisterTable, apb.RegisterTableRequest(
            name=name, csv=csv, word_column=word_column, replace=replace))

    def list_tables(self) -> list[apb.TableInfo]:
        return list(self._call(self.stub.ListTables, apb.ListTablesRequest()).tables)

    def delete_table(self, name: str) -> None:
        self._call(self.stub.DeleteTable, apb.DeleteTableRequest(name=name))


@dataclass(frozen=True)
class Activations:
    """What ``ExtractorClient.extract`` assembles from the streamed chunks."""

    words: list[str]
    layers: dict[int, np.ndarray]  # layer -> words x hidden_size, float32, in the request's word order
    from_cache: int  # (word, layer) vectors served from the service's cache
    model_digest: str
    template_digest: str
    adapter_digest: str = ""  # "" for the base model


class ExtractorClient(_Base):
    """Model ratings and layer activations from a running extractor."""

    def __init__(self, address: str | grpc.Channel, token: str | None = None, timeout: float | None = 3600.0,
                 **channel_options) -> None:
        super().__init__(address, token, timeout, **channel_options)
        from sensorium.v1 import extractor_pb2_grpc as epb_grpc

        self.stub = epb_grpc.ExtractorStub(self.channel)

    def list_models(self):
        from sensorium.v1 import extractor_pb2 as epb

        return list(self.stub.ListModels(epb.ListModelsRequest(), metadata=self.metadata, timeout=self.timeout).models)

    def rate(self, model: str, words: list[str], dimensions: list[str] | None = None, language: str = "en",
             max_new_tokens: int = 0, batch_size: int = 0, adapter: str = "", prompts: str = ""):
        """The service's RateResponse: per (word, dimension) expected rating, mass, answer, parsed.

        ``prompts``: a prompt set the service offers by name; "" = the built-in templates.
        """
        from sensorium.v1 import extractor_pb2 as epb

        request = epb.RateRequest(model=model, words=words, dimensions=dimensions or [], language=language,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, adapter=adapter,
                                  prompts=prompts)
        return self.stub.Rate(request, metadata=self.metadata, timeout=self.timeout)

    def extract(self, model: str, words: list[str], layers: list[int] | None = None,
                relative_depths: list[float] | None = None, pooling: str = "last",
                template: tuple[str, str] | None = None, batch_size: int = 0, adapter: str = "",
                timeout: float | None = None) -> Activations:
        """Pooled hidden states, streamed by the service in chunks and put back together here.

        ``timeout``: seconds for this call (default: the client's), e.g. what is left of a caller's deadline.
        """
        from sensorium.v1 import extractor_pb2 as epb

        request = epb.ExtractRequest(model=model, words=words, layers=layers or [],
                                     relative_depths=relative_depths or [], pooling=pooling, batch_size=batch_size,
                                     adapter=adapter)
        if template is not None:
            request.template.CopyFrom(epb.TemplateRef(language=template[0], dimension=template[1]))
        # each chunk is copied once, straight into its rows: a cache hit of 1,000 words x 31 layers
        # is 70 MB, and casting or concatenating it costs as much as receiving it
        layers_out: dict[int, np.ndarray] = {}
        cached, model_digest, template_digest, adapter_digest = 0, "", "", ""
        for chunk in self.stub.Extract(request, metadata=self.metadata,
                                       timeout=self.timeout if timeout is None else timeout):
            block = wire.matrix_from_proto(chunk.vectors, "vectors", np.float32)
            if chunk.layer not in layers_out:
                layers_out[chunk.layer] = np.empty((len(words), block.shape[1]), np.float32)
            layers_out[chunk.layer][chunk.first_word_index:chunk.first_word_index + block.shape[0]] = block
            cached += chunk.from_cache
            model_digest, template_digest, adapter_digest = chunk.model_digest, chunk.template_digest, \
                chunk.adapter_digest
        layers_out = dict(sorted(layers_out.items()))
        return Activations(list(words), layers_out, cached, model_digest, template_digest, adapter_digest)

    def nearest(self, model: str, layer: int, query: str | np.ndarray, k: int = 10, pooling: str = "last",
                template: tuple[str, str] | None = None, adapter: str = "") -> list[tuple[str, float]]:
        from sensorium.v1 import extractor_pb2 as epb

        request = epb.NearestRequest(model=model, layer=layer, pooling=pooling, k=k, adapter=adapter)
        if isinstance(query, str):
            request.word = query
        else:
            request.vector.CopyFrom(wire.matrix_to_proto(np.asarray(query).reshape(1, -1), "float32"))
        if template is not None:
            request.template.CopyFrom(epb.TemplateRef(language=template[0], dimension=template[1]))
        reply = self.stub.Nearest(request, metadata=self.metadata, timeout=self.timeout)
        return [(n.word, n.cosine) for n in reply.neighbours]

    def list_adapters(self, model: str = ""):
        """AdapterInfo of every adapter in the store (those trained on ``model`` when given)."""
        from sensorium.v1 import extractor_pb2 as epb

        request = epb.ListAdaptersRequest(model=model)
        return list(self.stub.ListAdapters(request, metadata=self.metadata, timeout=self.timeout).adapters)

    def load_adapter(self, model: str, adapter: str):
        from sensorium.v1 import extractor_pb2 as epb

        request = epb.AdapterRequest(model=model, adapter=adapter)
        return self.stub.LoadAdapter(request, metadata=self.metadata, timeout=self.timeout)

    def unload_adapter(self, model: str, adapter: str):
        from sensorium.v1 import extractor_pb2 as epb

        request = epb.AdapterRequest(model=model, adapter=adapter)
        return self.stub.UnloadAdapter(request, metadata=self.metadata, timeout=self.timeout)


class TrainerClient(_Base):
    """Fine-tuning jobs on a running trainer: submit, follow, cancel."""

    def __init__(self, address: str | grpc.Channel, token: str | None = None, timeout: float | None = 600.0,
                 **channel_options) -> None:
        super().__init__(address, token, timeout, **channel_options)
        from sensorium.v1 import trainer_pb2_grpc as tpb_grpc

        self.stub = tpb_grpc.TrainerStub(self.channel)

    def submit(self, spec: Any, *, idempotency_key: str = "", adapter_id: str = "", validate_only: bool = False):
        """Queue a job (or only check the spec); ``spec`` is a TrainingSpec, a dict or JSON text."""
        from sensorium.v1 import trainer_pb2 as tpb

        if hasattr(spec, "model_dump_json"):
            text = spec.model_dump_json()
        elif isinstance(spec, str):
            text = spec
        else:
            text = json.dumps(spec)
        request = tpb.SubmitRequest(spec_json=text, idempotency_key=idempotency_key, adapter_id=adapter_id,
                                    validate_only=validate_only)
        return self.stub.Submit(request, metadata=self.metadata, timeout=self.timeout)

    def job(self, job_id: str):
        from sensorium.v1 import trainer_pb2 as tpb

        return self.stub.GetJob(tpb.JobRequest(id=job_id), metadata=self.metadata, timeout=self.timeout)

    def jobs(self, states: list[int] | None = None, limit: int = 0):
        from sensorium.v1 import trainer_pb2 as tpb

        request = tpb.ListJobsRequest(states=states or [], limit=limit)
        return list(self.stub.ListJobs(request, metadata=self.metadata, timeout=self.timeout).jobs)

    def cancel(self, job_id: str):
        from sensorium.v1 import trainer_pb2 as tpb

        return self.stub.CancelJob(tpb.JobRequest(id=job_id), metadata=self.metadata, timeout=self.timeout)

    def watch(self, job_id: str, after_seq: int = 0, timeout: float | None = None) -> Iterator[Any]:
        """Events of a job as they happen, ending when the job ends; resumable from any ``seq``."""
        from sensorium.v1 import trainer_pb2 as tpb

        yield from self.stub.Watch(tpb.WatchRequest(id=job_id, after_seq=after_seq), metadata=self.metadata,
                                   timeout=timeout)

    def wait(self, job_id: str, on_event: Callable[[Any], None] | None = None, timeout: float | None = None,
             unavailable_for: float = 120.0):
        """Follow a job to its end, reconnecting after a dropped stream, and return the final Job.

        A trainer that restarts comes back with the job requeued, so the stream is reopened from
        the last event seen, with backoff; one that stays away ``unavailable_for`` seconds is an error.
        """
        after, deadline = 0, None if timeout is None else time.monotonic() + timeout
        down_since: float | None = None
        pause = 0.5
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                for event in self.watch(job_id, after, timeout=left):
                    after, down_since, pause = event.seq, None, 0.5
                    if on_event is not None:
                        on_event(event)
                return self.job(job_id)
            except grpc.RpcError as exc:
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if exc.code() != grpc.StatusCode.UNAVAILABLE or (deadline is not None and now > deadline) \
                        or now - down_since > unavailable_for:
                    raise
                time.sleep(pause)
                pause = min(2 * pause, 10.0)


class Client:
    """The three services behind one object, for pipelines: ``Client(analyzer=..., extractor=..., trainer=...)``.

    Give the addresses of the services you use; ``Client.from_env()`` reads them from
    ``SENSORIUM_ANALYZER_ADDRESS``, ``SENSORIUM_EXTRACTOR_ADDRESS``, ``SENSORIUM_TRAINER_ADDRESS``
    and the token from ``SENSORIUM_TOKEN``. Calls are retried with backoff while a service is
    unavailable; every other error is raised as ``grpc.RpcError`` with the service's status and message.
    """

    def __init__(self, analyzer: str = "", extractor: str = "", trainer: str = "", *, token: str | None = None,
                 **channel_options: Any) -> None:
        self._addresses = {"analyzer": analyzer, "extractor": extractor, "trainer": trainer}
        self._token, self._options = token, channel_options
        self._open: dict[str, _Base] = {}

    @classmethod
    def from_env(cls, **channel_options: Any) -> Client:
        import os

        address = {n: os.environ.get(f"SENSORIUM_{n.upper()}_ADDRESS", "")
                   for n in ("analyzer", "extractor", "trainer")}
        return cls(**address,
                   token=os.environ.get("SENSORIUM_TOKEN") or None, **channel_options)

    def _client(self, name: str, kind: type) -> Any:
        if name not in self._open:
            address = self._addresses[name]
            if not address:
                from sensorium.errors import FailedPrecondition

                raise FailedPrecondition(f"no address for the {name}: pass {name}='HOST:PORT' to Client")
            self._open[name] = kind(address, token=self._token, **self._options)
        return self._open[name]

    @property
    def analyzer(self) -> AnalyzerClient:
        return self._client("analyzer", AnalyzerClient)

    @property
    def extractor(self) -> ExtractorClient:
        return self._client("extractor", ExtractorClient)

    @property
    def trainer(self) -> TrainerClient:
        return self._client("trainer", TrainerClient)

    def close(self) -> None:
        for c in self._open.values():
            c.close()
        self._open.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
