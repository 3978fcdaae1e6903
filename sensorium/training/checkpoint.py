"""Training state on disk, so that a killed run resumes to the adapter it would have produced.

A checkpoint is one folder ``step-00000050/``: tensors as safetensors (adapter, best adapter,
optimizer moments, torch generator states) and everything else as JSON (step, data-order
position, history, scheduler, optimizer hyperparameters, Python and NumPy generator states).
Nothing is pickled, so reading a checkpoint can never run code.

The folder is written under a hidden temporary name and renamed into place, and its
``state.json`` lists every file's size and sha256; a folder that fails that check (a torn disk
write, a truncated copy) is set aside and the previous checkpoint is used instead. The last
``KEEP`` checkpoints are kept, so there is always one to fall back to.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sensorium.storage import fsync_path, sha256_file, writing

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT = 1
KEEP = 2
STATE = "state.json"
ADAPTER = "adapter.safetensors"
BEST_ADAPTER = "best_adapter.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
_NAME = re.compile(r"step-(\d{8})")


@dataclass
class Checkpoint:
    """A verified checkpoint, read back into tensors and JSON values."""

    path: Path
    step: int
    state: dict[str, Any]  # the loop's own JSON state
    adapter: dict[str, torch.Tensor]
    best_adapter: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]  # in ``Optimizer.state_dict()`` form
    scheduler: dict[str, Any]
    rng: dict[str, Any]  # see ``capture_rng``


# ---- random generators -------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Python, NumPy (legacy global) and torch generator states, in JSON and tensor parts."""
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return {"python": [version, list(internal), gauss],
            "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
            "tensors": tensors}


def restore_rng(rng: Mapping[str, Any]) -> None:
    import torch

    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = rng["tensors"]
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---- optimizer state without pickle ------------------------------------------------------------
def _split_optimizer(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, values in state_dict["state"].items():
        for name, value in values.items():
            key = f"{pid}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().to("cpu").contiguous()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- writing -------------------------------------------------------------------------------------
def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete-looking checkpoints, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def save(directory: Path, step: int, *, adapter: Mapping[str, torch.Tensor], optimizer: Mapping[str, Any],
         scheduler: Mapping[str, Any], state: Mapping[str, Any], rng: Mapping[str, Any],
         best_adapter: Mapping[str, torch.Tensor] | None = None, keep: int = KEEP) -> Path:
    """Write the checkpoint for ``step`` atomically, then drop all but the newest ``keep``."""
    directory = Path(directory)
    with writing("training checkpoint", directory):  # a full or read-only disk: named, not an errno
        return _save(directory, step, adapter=adapter, optimizer=optimizer, scheduler=scheduler, state=state,
                     rng=rng, best_adapter=best_adapter, keep=keep)


def _save(directory: Path, step: int, *, adapter: Mapping[str, torch.Tensor], optimizer: Mapping[str, Any],
          scheduler: Mapping[str, Any], state: Mapping[str, Any], rng: Mapping[str, Any],
          best_adapter: Mapping[str, torch.Tensor] | None, keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=directory))
    try:
        moments, optimizer_meta = _split_optimizer(optimizer)
        _save_tensors(tmp / ADAPTER, adapter)
        _save_tensors(tmp / OPTIMIZER, moments)
        _save_tensors(tmp / RNG, rng["tensors"])
        if best_adapter is not None:
            _save_tensors(tmp / BEST_ADAPTER, best_adapter)
        files = {}
        for p in sorted(tmp.iterdir()):
            fsync_path(p)
            files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        body = {"format": FORMAT, "step": step, "files": files, "state": dict(state), "scheduler": dict(scheduler),
                "optimizer": optimizer_meta, "rng": {k: v for k, v in rng.items() if k != "tensors"}}
        with open(tmp / STATE, "w", encoding="utf-8") as f:
            json.dump(body, f, sort_keys=True, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        if target.exists():  # re-saving a step after falling back past it: replace, never merge
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=directory))
            os.rename(target, aside / target.name)
            os.rename(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_path(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in directory.glob(".step-*.tmp-*"):  # from a process killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    return target


# ---- reading -------------------------------------------------------------------------------------
class DamagedCheckpoint(Exception):
    pass


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def read(path: Path) -> Checkpoint:
    """One checkpoint, every file checked against ``state.json``; DamagedCheckpoint otherwise."""
    path = Path(path)
    try:
        body = json.loads((path / STATE).read_text(encoding="utf-8"))
        if body.get("format") != FORMAT:
            raise DamagedCheckpoint(f"format {body.get('format')!r}, expected {FORMAT}")
        for name, meta in body["files"].items():
            file = path / name
            if file.stat().st_size != meta["size"] or sha256_file(file) != meta["sha256"]:
                raise DamagedCheckpoint(f"{name} does not match its checksum")
        for name in (ADAPTER, OPTIMIZER, RNG):
            if name not in body["files"]:
                raise DamagedCheckpoint(f"{name} is missing")
        has_best = BEST_ADAPTER in body["files"]
        return Checkpoint(
            path=path, step=int(body["step"]), state=body["state"], adapter=_load_tensors(path / ADAPTER),
            best_adapter=_load_tensors(path / BEST_ADAPTER) if has_best else None,
            optimizer=_join_optimizer(_load_tensors(path / OPTIMIZER), body["optimizer"]),
            scheduler=body["scheduler"], rng={**body["rng"], "tensors": _load_tensors(path / RNG)})
    except DamagedCheckpoint:
        raise
    except Exception as exc:  # JSON, OS and safetensors errors alike mean the folder cannot be trusted
        raise DamagedCheckpoint(f"{type(exc).__name__}: {exc}") from exc


def load_latest(directory: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged ones are renamed aside (kept for a post-mortem)."""
    for _, path in reversed(checkpoints(directory)):
        try:
            return read(path)
        except DamagedCheckpoint as exc:
            logger.warning("checkpoint %s is damaged (%s); falling back to the previous one", path, exc)
            aside = path.with_name(f".corrupt-{path.name}-{os.getpid()}")
            try:
                os.rename(path, aside)
            except OSError:
                shutil.rmtree(path, ignore_errors=True)
    return None
