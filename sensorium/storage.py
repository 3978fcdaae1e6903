"""Atomic, verified files: every store of the project writes through here.

A write goes to a temporary file in the same folder, is flushed to disk and renamed over the
target, so a reader sees the old file or the new one, never half of one. Checksums let a load
tell a damaged file from a good one instead of serving it.

A write the disk refuses (full, read-only) becomes ``StorageFull`` or ``StorageReadOnly`` naming
the store, so a caller is told what to fix instead of an errno; the temporary file is removed and
the previous file is untouched.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sensorium.errors import SensoriumError, StorageFull, StorageReadOnly

FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def library_versions(libraries: Iterable[str]) -> dict[str, str | None]:
    """Python's version and each installed library's (None where absent), for a stored record's provenance."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for lib in libraries:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, store: str, folder: Path) -> SensoriumError | None:
    """What a failed write means for the caller, or None when it is not about room or permission."""
    if exc.errno in FULL:
        return StorageFull(f"no space left on the {store} store ({folder}); free space and retry")
    if exc.errno in READ_ONLY:
        return StorageReadOnly(f"the {store} store is read-only or not writable ({folder}: "
                               f"{os.strerror(exc.errno)})")
    return None


@contextmanager
def writing(store: str, folder: Path) -> Iterator[None]:
    """Writes to ``store`` (a name for messages) under ``folder``: a full or read-only disk is named."""
    try:
        yield
    except OSError as exc:
        if (error := storage_error(exc, store, Path(folder))) is None:
            raise
        raise error from exc


def atomic_write_bytes(path: Path, data: bytes, store: str | None = None) -> None:
    """Replace ``path`` with ``data`` all at once; ``store`` names it in errors (default: its folder's name)."""
    path = Path(path)
    with writing(store or path.parent.name, path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_path(path.parent)


def atomic_write_json(path: Path, obj: Any, store: str | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), store)
