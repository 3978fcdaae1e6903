"""The one place that decides which gRPC status a library error becomes.

Servers, the CLI and tests all ask ``status_for`` so that a change of mapping cannot drift apart.
"""

from __future__ import annotations

import grpc

from sensorium import errors

_STATUS: dict[type[errors.SensoriumError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """Status for ``exc``; subclasses inherit their parent's code, anything unknown is INTERNAL."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL
