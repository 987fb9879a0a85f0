"""The OpenAI-compatible HTTP edge: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`
(and `GET /health`), served by aiohttp in the gateway's own event loop beside gRPC.

One request path: a request is authenticated by the same KeyStore and handed to the same Dispatcher
as a gRPC one, so keys, rate limits, budgets, fair queueing, routing, failover, cancellation,
idempotency (the `Idempotency-Key` header is the request_id) and its one usage record are the same
code. gateway/openai_api.py translates the bodies; this module only serves them.

- `Authorization: Bearer <API key>`, as over gRPC.
- `X-Request-Timeout: SECONDS` gives the request a deadline, as a gRPC deadline does (504 past it).
- A client that disconnects has its handler cancelled (aiohttp's handler cancellation): the worker
  stops the generation and the request is billed for what ran, as over gRPC.
- Every response names its run in `X-Request-Id` (the usage record's request_id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from fareway.auth import KeyStore
from fareway.errors import (
    DeadlineExceeded,
    FarewayError,
    Internal,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
    caller_error,
    shown,
)
from fareway.tls import ServerTls
from gateway import openai_api
from gateway.dispatch import Dispatcher
from gateway.openai_api import ChunkWriter, OpenAIRequest
from gateway.pool import WorkerPool, served_models
from gateway.run import Delta, Final
from gateway.tracing import generate_span

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 << 20
_SHUTDOWN_GRACE_S = 5.0
_MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}


class HttpCall:
    """The CallContext of an HTTP request (gateway/run.py): its deadline, from X-Request-Timeout. Nothing
    cancels an HTTP request at its deadline as gRPC does, so the edge runs it `within` the deadline."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def error_response(error: FarewayError) -> web.Response:
    shaped = openai_api.http_error(error)
    return web.json_response(shaped.body, status=shaped.status, headers=shaped.headers, dumps=_dumps)


@web.middleware
async def _openai_errors(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, wrong method, body too large) in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}.get(
            exc.status, "invalid_request_error")
        message = {404: f"no such endpoint {shown(request.path)}; Fareway serves /v1/chat/completions, "
                        "/v1/completions and /v1/models",
                   405: f"{request.method} is not allowed on {shown(request.path)}",
                   413: f"the request body is larger than {request.app[_MAX_BODY_BYTES]} bytes"}.get(
            exc.status, exc.reason)
        return web.json_response({"error": {"message": message, "type": kind, "param": None,
                                            "code": str(exc.status)}}, status=exc.status, dumps=_dumps)


class HttpEdge:
    def __init__(self, keys: KeyStore, pool: WorkerPool, dispatcher: Dispatcher,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.keys = keys
        self.pool = pool
        self.dispatcher = dispatcher
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[_openai_errors])
        self.app[_MAX_BODY_BYTES] = max_body_bytes
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/v1/models", self.list_models)
        self.app.router.add_get("/v1/models/{model}", self.get_model)
        self.app.router.add_get("/health", self.health)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, openai_api.chat_request)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, openai_api.completion_request)

    async def _generate(self, request: web.Request,
                        parse: Callable[[dict[str, Any]], OpenAIRequest]) -> web.StreamResponse:
        try:
            tenant = await self.keys.authenticate(_metadata(request))
            parsed = parse(await _json_body(request))
            message = parsed.message
            if (key := _idempotency_key(request)) is not None:
                message.request_id = key
            context = HttpCall(_timeout(request))
            run_id = message.request_id or uuid.uuid4().hex
            created = int(time.time())
            with generate_span(tenant, message) as describe_usage:
                if parsed.stream:
                    events = self.dispatcher.run(tenant, message, context, run_id)
                    return await self._stream(request, parsed, events, context, run_id, created, describe_usage)
                deadline = asyncio.timeout(context.timeout_s)
                try:
                    async with deadline:
                        response = await self.dispatcher.complete(tenant, message, context, run_id)  # type: ignore[arg-type]
                except TimeoutError:
                    raise _passed(deadline) from None
                describe_usage(response.usage)
        except web.HTTPException:
            raise   # aiohttp's own (a body too large), answered by the middleware
        except Exception as exc:  # noqa: BLE001 - every failure is answered, unexpected ones as INTERNAL
            return error_response(caller_error(exc))
        return web.json_response(openai_api.whole_response(parsed.kind, response, created, parsed.message.sampling),
                                 headers={"X-Request-Id": run_id}, dumps=_dumps)

    async def _stream(self, request: web.Request, parsed: OpenAIRequest, events: AsyncIterator[Delta | Final],
                      context: HttpCall, run_id: str, created: int,
                      describe_usage: Callable[[Any], None]) -> web.StreamResponse:
        """Server-sent events. Until the first event (admission, a worker taking it) a failure is an HTTP
        status; after it, an `error` event ends the stream."""
        async with contextlib.aclosing(events):
            deadline = asyncio.timeout(context.timeout_s)
            try:
                async with deadline:
                    event = await anext(events)
            except TimeoutError:
                raise _passed(deadline) from None
            writer = ChunkWriter(parsed.kind, run_id, parsed.message.model, created, parsed.include_usage,
                                 parsed.message.sampling)
            response = web.StreamResponse(headers={**_SSE_HEADERS, "X-Request-Id": run_id})
            await response.prepare(request)
            rest = asyncio.timeout_at(deadline.when())
            try:
                async with rest:
                    await self._send(response, writer, event, events, describe_usage)
            except TimeoutError:
                await response.write(openai_api.sse(openai_api.http_error(_passed(rest)).body))
            except ConnectionError:
                return response   # the client went away while being written to: the run is closed as cancelled
            await response.write_eof()
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, writer: ChunkWriter, event: Delta | Final,
                    events: AsyncIterator[Delta | Final], describe_usage: Callable[[Any], None]) -> None:
        """Writes the events as chunks, from `event` on; a failure of the run as an `error` event."""
        head = writer.opening()
        while True:
            if isinstance(event, Delta):
                await response.write(head + writer.delta(event))
                head = b""
            else:
                describe_usage(event.response.usage)
                await response.write(head + writer.closing(event.response, event.replayed))
                return
            try:
                event = await anext(events)
            except StopAsyncIteration:
                return
            except Exception as exc:  # noqa: BLE001 - told to the client in the stream
                await response.write(openai_api.sse(openai_api.http_error(caller_error(exc)).body))
                return

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            await self.keys.authenticate(_metadata(request))
            models = served_models(self.pool)
        except Exception as exc:  # noqa: BLE001
            return error_response(caller_error(exc))
        return web.json_response(openai_api.models_list(models), dumps=_dumps)

    async def get_model(self, request: web.Request) -> web.Response:
        try:
            await self.keys.authenticate(_metadata(request))
            name = request.match_info["model"]
            model = next((m for m in served_models(self.pool) if m.id == name), None)
            if model is None:
                raise NotFound(f"model {shown(name)} is not served; GET /v1/models lists them")
        except Exception as exc:  # noqa: BLE001
            return error_response(caller_error(exc))
        return web.json_response(openai_api.model_object(model), dumps=_dumps)

    async def health(self, request: web.Request) -> web.Response:
        """200 while at least one worker can be reached (as the gRPC health service's SERVING), else 503."""
        if self.pool.is_serving:
            return web.json_response({"status": "serving"})
        return error_response(Unavailable("no worker can be reached"))


def _passed(deadline: asyncio.Timeout) -> Exception:
    """The error for a request whose X-Request-Timeout ran out, if that is why it timed out."""
    if deadline.expired():
        return DeadlineExceeded("the request's deadline (X-Request-Timeout) passed")
    return Internal("a call timed out inside the gateway")


def _metadata(request: web.Request) -> list[tuple[str, str]]:
    value = request.headers.get("Authorization")
    if value is not None and not _is_utf8(value):
        raise Unauthenticated("the Authorization header is not UTF-8 text; send 'Bearer <API key>'")
    return [] if value is None else [("authorization", value)]


def _idempotency_key(request: web.Request) -> str | None:
    value = request.headers.get("Idempotency-Key")
    if value is not None and not _is_utf8(value):
        raise InvalidArgument("the Idempotency-Key header is not UTF-8 text; use 1-128 characters of A-Z, a-z, 0-9, "
                              "'.', '_', ':', '-'", field="Idempotency-Key")
    return value


def _is_utf8(value: str) -> bool:
    """Whether a header's bytes were UTF-8: aiohttp keeps other bytes as lone surrogates, which no key, id or
    protobuf string can hold."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


async def _json_body(request: web.Request) -> dict[str, Any]:
    limit = request.app[_MAX_BODY_BYTES]
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)  # before reading it
    raw = await request.read()
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"the request body is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    except UnicodeDecodeError:
        raise InvalidArgument("the request body is not valid JSON: it is not UTF-8 (or UTF-16, UTF-32) text") from None
    except ValueError:  # what json.loads raises on an integer of thousands of digits
        raise InvalidArgument(f"the request body has a number longer than {sys.get_int_max_str_digits()} digits") \
            from None
    except RecursionError:
        raise InvalidArgument("the request body nests arrays or objects too deeply") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def _timeout(request: web.Request) -> float | None:
    value = request.headers.get("X-Request-Timeout")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidArgument("X-Request-Timeout must be a positive number of seconds", field="X-Request-Timeout")
    return seconds


def _host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--http-listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@contextlib.asynccontextmanager
async def serving_http(edge: HttpEdge, listen: str, tls: ServerTls | None = None) -> AsyncIterator[int]:
    """Serves the edge on `listen` (HOST:PORT; port 0 picks a free one) until the block ends; the port."""
    host, port = _host_port(listen)
    runner = web.AppRunner(edge.app, handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=tls.ssl_context() if tls else None)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
