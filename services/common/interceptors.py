"""Server interceptors: request ids, metrics, bearer-token auth and error translation.

Each interceptor is a *guard*: an async context manager entered around the servicer method.
``wrap_handler`` applies a guard to any of the four RPC cardinalities, so every concern is written
once instead of once per cardinality, and the servicers stay free of transport code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from sensorium.errors import InvalidArgument, SensoriumError
from services.common.errors import status_for
from services.common.logging import current_request_id, request_id_var

logger = logging.getLogger(__name__)

Guard = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}

# Created once per process: several servers in one process (tests) share them instead of
# registering duplicates on the default registry, which the exporter serves.
RPC_REQUESTS = Counter(
    "sensorium_rpc_requests_total", "RPCs handled, by final status code.", ["service", "method", "code"]
)
RPC_DURATION = Histogram(
    "sensorium_rpc_duration_seconds",
    "Time spent handling an RPC.",
    ["service", "method"],
    # Past the default 10 s ceiling: extraction and training RPCs run for minutes.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)


def wrap_handler(handler: grpc.RpcMethodHandler | None, guard: Guard,
                 parse: Callable[[bytes], Any] | None = None) -> grpc.RpcMethodHandler | None:
    """Return ``handler`` with its behaviour run inside ``guard(context)``, whatever its cardinality.

    With ``parse`` (unary requests only), the request arrives as bytes and is parsed inside the
    guard, so that a parse error is the servicer's to answer rather than gRPC's.
    """
    if handler is None:
        return None
    streaming = (handler.request_streaming, handler.response_streaming)
    behaviour = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[streaming]
    read: Callable[[Any], Any] = parse if parse is not None else (lambda request: request)
    wrapped: Callable[..., Any]

    if inspect.isasyncgenfunction(behaviour) or inspect.isgeneratorfunction(behaviour):
        # Streaming responses produced by yielding: stay a generator so gRPC keeps iterating.
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with guard(context):
                responses = behaviour(read(request), context)
                if hasattr(responses, "__aiter__"):
                    async for response in responses:
                        yield response
                else:
                    for response in responses:
                        yield response

    else:
        # Unary responses, and streaming ones written with ``context.write`` (the health Watch).
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(context):
                result = behaviour(read(request), context)
                return await result if inspect.isawaitable(result) else result

    return _FACTORIES[streaming](
        wrapped,
        request_deserializer=handler.request_deserializer if parse is None else None,
        response_serializer=handler.response_serializer,
    )


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Base class: subclasses implement ``guard`` and get all cardinalities wrapped for free."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        return wrap_handler(handler, lambda context: self.guard(context, handler_call_details))

    def guard(
        self, context: grpc.aio.ServicerContext, details: grpc.HandlerCallDetails
    ) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


class RequestIdInterceptor(GuardInterceptor):
    """Adopts the caller's ``x-request-id`` or makes one, and echoes it in trailing metadata."""

    @asynccontextmanager
    async def guard(self, context: grpc.aio.ServicerContext, details: grpc.HandlerCallDetails) -> AsyncIterator[None]:
        # Each RPC runs in its own task with its own context copy, so no reset is needed.
        request_id = _metadata(details, "x-request-id") or uuid.uuid4().hex
        request_id_var.set(request_id)
        context.set_trailing_metadata((("x-request-id", request_id),))
        yield


class MetricsInterceptor(GuardInterceptor):
    """Counts RPCs by final status and times them, including those refused by auth."""

    @asynccontextmanager
    async def guard(self, context: grpc.aio.ServicerContext, details: grpc.HandlerCallDetails) -> AsyncIterator[None]:
        service, _, method = details.method.lstrip("/").rpartition("/")
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED  # client went away, or the server stopped
            raise
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN  # only without an ErrorInterceptor
            raise
        finally:
            if code is grpc.StatusCode.OK and context.code() is not None:
                code = context.code()
            RPC_REQUESTS.labels(service, method, code.name).inc()
            RPC_DURATION.labels(service, method).observe(time.perf_counter() - start)


class AuthInterceptor(GuardInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except health checks.

    Health is exempt so orchestrators can probe liveness without holding the secret.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    @asynccontextmanager
    async def guard(self, context: grpc.aio.ServicerContext, details: grpc.HandlerCallDetails) -> AsyncIterator[None]:
        if not details.method.startswith("/grpc.health.v1.Health/"):
            presented = (_metadata(details, "authorization") or "").encode()
            if not hmac.compare_digest(presented, self._expected):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        yield


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Parses request bytes inside the RPC, so that bytes that are not the declared message get
    INVALID_ARGUMENT with a message instead of gRPC's own INTERNAL "Exception deserializing request!".

    It must be the innermost interceptor: the guards outside it (auth, metrics, errors) are entered
    first, so an unauthenticated caller learns nothing about whether its bytes parsed.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method

        def decoded(raw: bytes) -> Any:
            try:
                return parse(raw)
            except Exception:  # DecodeError, or a parser's own error on bytes of the wrong shape
                raise InvalidArgument(f"the request is not a valid message for {method} "
                                      f"({len(raw)} bytes that do not parse)") from None

        return wrap_handler(handler, lambda context: contextlib.nullcontext(), decoded)


MAX_DETAILS = 2_000  # characters of a refusal's message: status details travel in trailers (8 KiB by default)


def _bounded(details: str) -> str:
    """A message that fits in the trailers: refusals quote what the caller sent, which may be huge,
    and oversized trailers would replace the refusal with a transport error."""
    return details if len(details) <= MAX_DETAILS else f"{details[:MAX_DETAILS - 40]}... ({len(details):,} characters)"


class ErrorInterceptor(GuardInterceptor):
    """Turns library errors into their status codes and hides everything else behind a request id.

    Library errors carry messages written for the caller; other exceptions may carry paths or
    data, so only their request id leaves the server and the traceback goes to the log.
    """

    @asynccontextmanager
    async def guard(self, context: grpc.aio.ServicerContext, details: grpc.HandlerCallDetails) -> AsyncIterator[None]:
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except SensoriumError as exc:
            await context.abort(status_for(exc), _bounded(str(exc)))
        except Exception:
            code = context.code()
            if code is not None and code is not grpc.StatusCode.OK:
                # The servicer chose a status before failing: keep it, and its details, not the exception's.
                await context.abort(code, context.details() or "")
            logger.exception("unhandled error in %s", details.method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {current_request_id()})")
