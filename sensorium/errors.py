"""Library errors, one class per way a request can be wrong.

The services translate these into gRPC status codes (see ``services.common.errors``) and the
CLI into a one-line message and a non-zero exit, so the library never needs to know who called it.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

B = TypeVar("B", bound=BaseModel)


class SensoriumError(Exception):
    """Base class: a request that cannot be served, with a message meant for the caller."""


class InvalidArgument(SensoriumError):
    """The request itself is wrong (shapes, values, names); retrying it unchanged will fail again."""


class NotFound(SensoriumError):
    """A named thing (table, model, adapter, template, dataset) does not exist."""


class ResourceExhausted(SensoriumError):
    """The request is larger than a configured limit allows."""


class FailedPrecondition(SensoriumError):
    """The request is well-formed but the system is not in a state to serve it."""


class AlreadyExists(SensoriumError):
    """A resource with that name exists and the request would overwrite it."""


class Unauthenticated(SensoriumError):
    """The caller did not present valid credentials."""


class Unavailable(SensoriumError):
    """A service this one depends on cannot be reached; retrying later may succeed."""


class StorageFull(ResourceExhausted):
    """A store's disk or quota is full (ENOSPC, EDQUOT): nothing was written, what it held is intact."""


class StorageReadOnly(FailedPrecondition):
    """A store cannot be written (EROFS, EACCES, EPERM): nothing was written, what it held is intact."""


class Cancelled(SensoriumError):
    """The caller stopped waiting (it cancelled, or its deadline passed), so the work stopped early.

    Long computations (``rate``, ``iter_activations``) take a ``threading.Event`` that the service
    sets when the RPC that asked for them ends, and call ``check`` between batches: a forward pass
    cannot be interrupted, but nothing after it is computed for nobody. ``done`` of ``total`` says
    how far the work got.
    """

    def __init__(self, message: str = "cancelled", *, done: int = 0, total: int = 0, unit: str = "words") -> None:
        super().__init__(message)
        self.done, self.total, self.unit = done, total, unit

    @classmethod
    def after(cls, done: int, total: int, unit: str = "words") -> Cancelled:
        return cls(f"cancelled after {done} of {total} {unit}", done=done, total=total, unit=unit)

    @classmethod
    def check(cls, cancel: threading.Event | None, done: int, total: int, unit: str = "words") -> None:
        """Raise when ``cancel`` is set; called at batch boundaries, where stopping loses nothing."""
        if cancel is not None and cancel.is_set():
            raise cls.after(done, total, unit)


def _invalid(model: type[BaseModel], exc: ValidationError) -> InvalidArgument:
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
    return InvalidArgument(f"invalid {model.__name__}: {problems}")


def validated(model: type[B], **fields: Any) -> B:
    """A pydantic model built from caller input: a bad field is the caller's error, named."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise _invalid(model, exc) from None


def validated_json(model: type[B], text: str | bytes) -> B:
    """The same, from a JSON document; errors name each bad field by its path (``optim.epochs``)."""
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise _invalid(model, exc) from None
