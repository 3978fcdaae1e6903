"""LoRA adapters: the store the trainer publishes to, and the adapters resident on a base model.

An adapter is the outcome of a fine-tuning run: a peft ``adapter_config.json`` and
``adapter_model.safetensors``, plus a manifest naming the base model (by name and by digest),
every file's size and checksum, and what the trainer recorded about how it was made. It is
published all at once (built in a hidden sibling folder, then renamed), so an adapter that is
listed is complete; a half-written one is never seen. An id is also a folder name, so it is
checked against the same pattern as a model name and cannot climb out of the store.

On a served model, adapters are injected in place (``transformers``' peft integration): one
resident base model, any number of adapters, one active at a time, switched per request
without reloading the base. With every adapter disabled the model computes exactly what the
base computes, so base vectors and base ratings are unchanged by adapters being loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sensorium.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from sensorium.storage import atomic_write_json, sha256_bytes, sha256_file, writing

logger = logging.getLogger(__name__)

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
MANIFEST = "sensorium-adapter.json"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
STORE = "adapter"  # the store's name in errors
FILES = (CONFIG, WEIGHTS)
FORMAT = 1
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # as the model store's


def check_adapter_id(adapter_id: str) -> str:
    """An id becomes a folder name: nothing that could climb out of the store or hide."""
    if not isinstance(adapter_id, str) or not re.fullmatch(ID_PATTERN, adapter_id):
        raise InvalidArgument(
            f"invalid adapter id {adapter_id!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return adapter_id


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class AdapterManifest(BaseModel):
    """What an adapter is, read from its folder; ``digest`` is what cached vectors are keyed by."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int
    id: str = Field(pattern=f"^{ID_PATTERN}$")
    base_model: str  # the registry name it was trained on
    base_digest: str  # that model's digest: the check that matters, names can be reused
    created: str
    files: dict[str, FileEntry]
    digest: str
    training: dict[str, Any] = Field(default_factory=dict)  # objective, hyperparameters, split, ...


def _refuse_links(adapter_id: str, entry: Path, names: tuple[str, ...]) -> None:
    """An entry is a real folder of real files: a link, which could point out of the store, is refused.

    The trainer publishes by copying files into a fresh folder, so a link in the store was put
    there by something else; following it would let an adapter id read files from anywhere.
    """
    for path in (entry, *(entry / n for n in names)):
        if path.is_symlink():
            raise FailedPrecondition(f"adapter {adapter_id!r}: {path.name} is a link in the adapter store; "
                                     "links are never followed")


def _digest_of(files: Mapping[str, FileEntry]) -> str:
    return sha256_bytes("".join(f"{name}\t{files[name].sha256}\n" for name in sorted(files)).encode())


def _read_no_link(path: Path) -> bytes:
    """A file's bytes, refusing (ELOOP) a link swapped in after ``manifest`` checked the entry."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read()


class AdapterStore:
    """Published adapters under ``root/<id>/``; the trainer writes, extractors read."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, adapter_id: str) -> Path:
        return self.root / check_adapter_id(adapter_id)

    def publish(self, adapter_id: str, source: Path, *, base_model: str, base_digest: str,
                training: Mapping[str, Any] | None = None,
                extra_files: Mapping[str, bytes] | None = None) -> AdapterManifest:
        """Copy a peft ``save_pretrained`` folder into the store as one atomic entry.

        Only the config and the safetensors weights are taken: a pickled ``adapter_model.bin``
        could run code when loaded and is refused. ``extra_files`` (e.g. the split's word lists,
        too long for the manifest) are stored and checksummed with them.
        """
        extra = dict(extra_files or {})
        for name in extra:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}\.(json|csv|txt)", name) or name in (*FILES, MANIFEST):
                raise InvalidArgument(f"extra adapter file name {name!r} is not allowed")
        target = self.path(adapter_id)
        source = Path(source)
        missing = [n for n in FILES if not (source / n).is_file()]
        if missing:
            hint = " (pickle weights are not accepted)" if (source / "adapter_model.bin").exists() else ""
            raise FailedPrecondition(f"{source} lacks {', '.join(missing)}{hint}")
        if target.exists():
            raise AlreadyExists(f"adapter {adapter_id!r} already exists in {self.root}")
        with writing(STORE, self.root):  # a full or read-only disk: named, the store as it was
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{adapter_id}.tmp-", dir=self.root))
            try:
                files = {}
                for name in FILES:
                    shutil.copyfile(source / name, tmp / name)
                for name, data in extra.items():
                    (tmp / name).write_bytes(data)
                for name in (*FILES, *extra):
                    with open(tmp / name, "rb") as f:
                        os.fsync(f.fileno())
                    files[name] = FileEntry(size=(tmp / name).stat().st_size, sha256=sha256_file(tmp / name))
                manifest = AdapterManifest(
                    format=FORMAT, id=adapter_id, base_model=base_model, base_digest=base_digest,
                    created=datetime.now(UTC).isoformat(timespec="seconds"), files=files, digest=_digest_of(files),
                    training=dict(training or {}))
                atomic_write_json(tmp / MANIFEST, manifest.model_dump(mode="json"), STORE)
                for p in tmp.iterdir():
                    os.chmod(p, 0o644)
                os.chmod(tmp, 0o755)
                try:
                    os.rename(tmp, target)  # fails if another publisher won the race: never overwrite
                except OSError as exc:
                    raise AlreadyExists(f"adapter {adapter_id!r} already exists in {self.root}") from exc
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        logger.info("adapter published", extra={"adapter": adapter_id, "base_model": base_model})
        return manifest

    def remove_unfinished(self, min_age_seconds: float = 3600.0) -> list[str]:
        """Delete hidden build folders a publisher killed half way left behind; their names.

        They are never listed, but nothing else would ever remove them. Only folders older than
        ``min_age_seconds`` go: a publish takes seconds, and another publisher sharing the store
        may be building one right now.
        """
        if not self.root.is_dir():
            return []
        cutoff = time.time() - min_age_seconds
        removed = []
        for path in self.root.iterdir():
            if re.fullmatch(r"\.[A-Za-z0-9][A-Za-z0-9._-]{0,63}\.tmp-[A-Za-z0-9_]+", path.name) and \
                    not path.is_symlink() and path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        if removed:
            logger.warning("removed unfinished adapter folders", extra={"folders": sorted(removed)})
        return sorted(removed)

    def manifest(self, adapter_id: str, *, verify: bool = False) -> AdapterManifest:
        """The manifest of a complete entry; ``verify`` rehashes the files too.

        NotFound for an id that is not in the store, FailedPrecondition for a damaged entry.
        """
        path = self.path(adapter_id)
        if not path.is_dir():
            raise NotFound(f"unknown adapter {adapter_id!r} in {self.root}")
        _refuse_links(adapter_id, path, (MANIFEST,))
        try:
            manifest = AdapterManifest.model_validate(json.loads((path / MANIFEST).read_text()))
        except (OSError, ValueError, ValidationError) as exc:
            raise FailedPrecondition(f"adapter {adapter_id!r}: manifest missing or unreadable ({exc})") from exc
        if manifest.id == adapter_id and not set(FILES) <= set(manifest.files) and \
                any(fnmatch(n, p) for n in manifest.files for p in PICKLE_WEIGHTS):
            raise FailedPrecondition(f"adapter {adapter_id!r}: its weights are not {WEIGHTS}; only safetensors "
                                     "weights are loaded, pickle weights can run code when read")
        if manifest.id != adapter_id or manifest.format != FORMAT or not set(FILES) <= set(manifest.files):
            raise FailedPrecondition(f"adapter {adapter_id!r}: manifest does not describe this entry")
        _refuse_links(adapter_id, path, tuple(manifest.files))
        for name, entry in manifest.files.items():
            try:
                size = (path / name).stat().st_size
            except OSError:
                raise FailedPrecondition(f"adapter {adapter_id!r}: {name} is missing") from None
            if size != entry.size or (verify and sha256_file(path / name) != entry.sha256):
                raise FailedPrecondition(f"adapter {adapter_id!r}: {name} does not match its manifest")
        if _digest_of(manifest.files) != manifest.digest:
            raise FailedPrecondition(f"adapter {adapter_id!r}: digest does not match the file checksums")
        return manifest

    def list(self) -> list[AdapterManifest]:
        """Complete, undamaged entries, by id; damaged ones are logged and left for inspection."""
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not path.is_dir() or not re.fullmatch(ID_PATTERN, path.name) \
                    or path.is_symlink():
                continue
            try:
                out.append(self.manifest(path.name))
            except FailedPrecondition as exc:
                logger.warning("adapter entry skipped: %s", exc)
        return out

    def read(self, adapter_id: str) -> tuple[AdapterManifest, dict[str, Any], dict[str, Any]]:
        """Manifest, peft config and weights, checked against the manifest's checksums as read."""
        from safetensors.torch import load as load_safetensors

        manifest = self.manifest(adapter_id)
        path = self.path(adapter_id)
        blobs = {name: _read_no_link(path / name) for name in FILES}
        for name, data in blobs.items():
            if sha256_bytes(data) != manifest.files[name].sha256:
                raise FailedPrecondition(f"adapter {adapter_id!r}: {name} does not match its checksum")
        try:
            config = json.loads(blobs[CONFIG])
            weights = load_safetensors(blobs[WEIGHTS])
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise FailedPrecondition(f"adapter {adapter_id!r}: files cannot be read ({exc})") from exc
        if not isinstance(config, dict):
            raise FailedPrecondition(f"adapter {adapter_id!r}: {CONFIG} is not an object")
        return manifest, config, weights

    def delete(self, adapter_id: str) -> None:
        """Remove an entry: renamed out of sight first, so no reader sees it half removed."""
        path = self.path(adapter_id)
        if not path.is_dir():
            raise NotFound(f"unknown adapter {adapter_id!r} in {self.root}")
        gone = Path(tempfile.mkdtemp(prefix=f".{adapter_id}.deleted-", dir=self.root))
        os.rename(path, gone / adapter_id)
        shutil.rmtree(gone, ignore_errors=True)


class AdapterHost:
    """The adapters resident on one base model, and the lock that makes switching them safe.

    Adapters are injected into the model in place, so two requests must never run on it with
    different adapters at once: every use holds ``lock`` from activation to the last forward.
    At most ``max_loaded`` stay resident; loading one more unloads the least recently used.
    """

    def __init__(self, model: Any, model_name: str, model_digest: str, store: AdapterStore,
                 max_loaded: int = 8) -> None:
        self.model = model
        self.model_name = model_name
        self.model_digest = model_digest
        self.store = store
        self.max_loaded = max_loaded
        self.lock = threading.RLock()
        self._loaded: OrderedDict[str, AdapterManifest] = OrderedDict()

    def loaded(self) -> list[AdapterManifest]:
        with self.lock:
            return list(self._loaded.values())

    def is_loaded(self, adapter_id: str) -> bool:
        return adapter_id in self._loaded

    def check(self, adapter_id: str) -> AdapterManifest:
        """The manifest of an adapter that fits this model, without loading its weights."""
        manifest = self.store.manifest(adapter_id)
        if manifest.base_digest != self.model_digest:
            raise FailedPrecondition(
                f"adapter {adapter_id!r} was trained on model {manifest.base_model!r} "
                f"(digest {manifest.base_digest[:12]}), not on {self.model_name!r} "
                f"(digest {self.model_digest[:12]})")
        return manifest

    def load(self, adapter_id: str) -> AdapterManifest:
        """Make an adapter resident (idempotent); refuse one trained on another base model."""
        check_adapter_id(adapter_id)
        with self.lock:
            if adapter_id in self._loaded:
                self._loaded.move_to_end(adapter_id)
                return self._loaded[adapter_id]
            self.check(adapter_id)
            manifest, config, weights = self.store.read(adapter_id)
            while len(self._loaded) >= self.max_loaded:
                self.unload(next(iter(self._loaded)))
            self._inject(adapter_id, config, weights)
            self._loaded[adapter_id] = manifest
            logger.info("adapter loaded", extra={"adapter": adapter_id, "model": self.model_name})
            return manifest

    def _inject(self, adapter_id: str, config: dict[str, Any], weights: dict[str, Any]) -> None:
        from peft import LoraConfig

        try:
            peft_config = LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__})
            weights = {k: v.to(device=self.model.device, dtype=self.model.dtype) for k, v in weights.items()}
            with warnings.catch_warnings():  # several adapters on one model is the point, not an accident
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.model.load_adapter(adapter_name=adapter_id, peft_config=peft_config,
                                        adapter_state_dict=weights)
        except Exception as exc:  # peft reports bad configs and shape mismatches with many types
            self._forget(adapter_id)
            raise FailedPrecondition(f"adapter {adapter_id!r} cannot be applied to {self.model_name!r}: {exc}") \
                from exc
        self.model.eval()
        self.model.requires_grad_(False)

    def unload(self, adapter_id: str) -> AdapterManifest:
        """Free an adapter's weights; the base model stays resident."""
        with self.lock:
            if adapter_id not in self._loaded:
                raise NotFound(f"adapter {adapter_id!r} is not loaded on model {self.model_name!r}")
            manifest = self._loaded.pop(adapter_id)
            self._forget(adapter_id)
            logger.info("adapter unloaded", extra={"adapter": adapter_id, "model": self.model_name})
            return manifest

    def _forget(self, adapter_id: str) -> None:
        config = getattr(self.model, "peft_config", None) or {}
        if adapter_id in config:
            self.model.delete_adapter(adapter_id)
        if not getattr(self.model, "peft_config", None):
            # with no adapter left, the integration's bookkeeping is reset to a plain model
            self.model._hf_peft_config_loaded = False

    @contextmanager
    def use(self, adapter_id: str | None) -> Iterator[AdapterManifest | None]:
        """Hold the model with ``adapter_id`` active (None: the base model) for a computation."""
        with self.lock:
            manifest = self.load(adapter_id) if adapter_id else None
            peft_on = bool(getattr(self.model, "peft_config", None))
            if peft_on:
                if manifest is None:
                    self.model.disable_adapters()
                else:
                    self.model.enable_adapters()
                    self.model.set_adapter(adapter_id)
            yield manifest
