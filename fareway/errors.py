"""One root exception for every Fareway service, mapped to gRPC statuses in one place.

Domain code raises a FarewayError subclass; `mapping_errors` (wrapped around each
method handler when its service registers, through ErrorMappingServer) turns it into a
status with a `google.rpc.Status` in the trailers, carrying BadRequest,
QuotaFailure or RetryInfo details where they help the caller act.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from fareway.inference.v1 import inference_pb2
from fareway.redis import UNREACHABLE

log = logging.getLogger(__name__)

SHOWN_CHARS = 40
"""How much of a caller's value an error message quotes."""
MAX_MESSAGE_CHARS = 1024
"""The longest message an error carries: gRPC's trailers (8 KiB by default) must hold it twice (the
status message and the google.rpc.Status detail), whatever a caller sent."""


def shown(value: object) -> str:
    """A value from the caller, as an error message may quote it: repr, cut to a few dozen characters."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}...' ({len(text)} characters)"


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"


class FarewayError(Exception):
    """Root of every error a Fareway service reports to its caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, details: list[Any] | None = None) -> None:
        message = _bounded(message)
        super().__init__(message)
        self.message = message
        self.details = details or []
        """Protobuf messages from google.rpc.error_details_pb2."""

    def to_status(self) -> status_pb2.Status:
        packed = []
        for detail in self.details:
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


class InvalidArgument(FarewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, field: str | None = None) -> None:
        message = _bounded(message)
        details = []
        if field:
            violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
            details.append(error_details_pb2.BadRequest(field_violations=[violation]))
        super().__init__(message, details=details)
        self.field = field


class Unauthenticated(FarewayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FarewayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(FarewayError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(FarewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(FarewayError):
    code = grpc.StatusCode.ABORTED


class ResourceExhausted(FarewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, subject: str = "", retry_after_s: float | None = None) -> None:
        violation = error_details_pb2.QuotaFailure.Violation(subject=subject, description=message)
        details: list[Any] = [error_details_pb2.QuotaFailure(violations=[violation])]
        if retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        super().__init__(message, details=details)


class Unavailable(FarewayError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FarewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(FarewayError):
    code = grpc.StatusCode.CANCELLED


class Internal(FarewayError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[FarewayError]] = {
    cls.code: cls
    for cls in (InvalidArgument, Unauthenticated, PermissionDenied, NotFound, FailedPrecondition, Aborted,
                ResourceExhausted, Unavailable, DeadlineExceeded, Cancelled, Internal)
}


def from_rpc_error(error: grpc.aio.AioRpcError, *, prefix: str = "") -> FarewayError:
    """The FarewayError for a status received from another service: same code, message and details."""
    cls = _BY_CODE.get(error.code(), FarewayError)
    result = cls(f"{prefix}{error.details() or error.code().name}")
    result.code = error.code()
    result.details = status_details(error)
    return result


async def abort(context: grpc.aio.ServicerContext, error: FarewayError) -> None:
    """Ends the RPC with the error's status and its rich details."""
    if error.details:
        status = rpc_status.to_status(error.to_status())
        await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
    await context.abort(error.code, error.message)


def _internal(exc: BaseException) -> Internal:
    ref = uuid.uuid4().hex[:12]
    log.error("internal error (ref %s)", ref, exc_info=exc)
    return Internal(f"internal error (ref {ref}); the server log has the details")


class _Throttle:
    """Says yes at most once every `interval_s` (for a log line that every request would repeat)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = -interval_s

    def is_due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return False
        self._last = now
        return True


_REDIS_AWAY_LOG = _Throttle(10.0)


def _redis_away(exc: BaseException) -> Unavailable:
    """A request that needed Redis while it was away: UNAVAILABLE, which callers retry (the address
    and the cause go to the log, at most every 10 s, not to the caller)."""
    if _REDIS_AWAY_LOG.is_due():
        log.warning("requests fail while Redis is unreachable: %s", exc)
    return Unavailable("Redis, which holds the keys, limits, budgets and usage, is unreachable; retry shortly")


def caller_error(exc: Exception) -> FarewayError:
    """What the caller is told of an exception: a FarewayError as it is, Redis away as UNAVAILABLE, anything
    else as INTERNAL with a reference to the log."""
    if isinstance(exc, FarewayError):
        return exc
    if isinstance(exc, UNREACHABLE):
        return _redis_away(exc)
    return _internal(exc)


class _Undecodable:
    """A request whose bytes do not parse as its message (the handler answers INVALID_ARGUMENT)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The request deserializer, failing into an _Undecodable instead of raising: grpc would answer a
    deserializer's exception with UNKNOWN, which says nothing to the caller."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or invalid UTF-8 in a string field
            return _Undecodable(exc)
    return deserialize


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument("the request is not a valid message of this method's type (malformed protobuf, or "
                              "a string field that is not UTF-8)")
    return request


def _wrap_unary(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(_decoded(request), context)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, unexpected ones as INTERNAL
            await abort(context, caller_error(exc))
    return wrapper


def _wrap_stream(handler: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in handler(_decoded(request), context):
                yield response
        except Exception as exc:  # noqa: BLE001
            await abort(context, caller_error(exc))
    return wrapper


def mapping_errors(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The method handler, with FarewayError (and any unexpected exception) answered as its gRPC status
    (request-streaming methods as they are)."""
    if handler.request_streaming:
        return handler
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        _wrap_unary(handler.unary_unary),
        request_deserializer=_tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class ErrorMappingServer:
    """Stands in for a grpc.aio server while a service registers (its generated `add_*_to_server`):
    each method handler is wrapped by `mapping_errors` once, there, rather than by an interceptor on
    every call (a server with an interceptor runs each call through an interceptor pipeline)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_ErrorMappingHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service_name, {name: mapping_errors(handler) for name, handler in method_handlers.items()})


class _ErrorMappingHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._mapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        """method -> (the inner handler, wrapped): each wrapped once."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        mapped = self._mapped.get(handler_call_details.method)
        if mapped is None or mapped[0] is not handler:
            mapped = self._mapped[handler_call_details.method] = (handler, mapping_errors(handler))
        return mapped[1]


def status_details(error: grpc.aio.AioRpcError) -> list[Any]:
    """The rich details (BadRequest, QuotaFailure, ...) a status carries, unpacked."""
    for key, value in error.trailing_metadata() or ():
        if key == rpc_status.GRPC_DETAILS_METADATA_KEY:
            status = status_pb2.Status.FromString(value)
            return [_unpack(detail) for detail in status.details]
    return []


_DETAIL_TYPES = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (error_details_pb2.BadRequest, error_details_pb2.QuotaFailure,
                error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo,
                inference_pb2.Usage)  # what a worker's failed generation spent (WorkerService.Complete)
}


def _unpack(holder: any_pb2.Any) -> Any:
    cls = _DETAIL_TYPES.get(holder.TypeName())
    if cls is None:
        return holder
    message = cls()
    holder.Unpack(message)
    return message


