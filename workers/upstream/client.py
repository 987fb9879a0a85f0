"""Calls to an OpenAI-compatible engine (vLLM, SGLang, TGI, llama.cpp's server, Ollama, `transformers
serve`): every request streamed (so the worker observes it as it runs), its failures as Fareway
errors.

- Its 400 (and 404, 413, 422: the request is wrong for it) -> INVALID_ARGUMENT with its message.
- Its 429, 5xx, a refused or broken connection, and 401/403 (this worker's credentials) ->
  UNAVAILABLE, so the gateway fails over before the first token.
- A deadline that passes -> DEADLINE_EXCEEDED.
Closing a stream closes its connection, which is how vLLM and SGLang learn to abort the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from fareway.errors import DeadlineExceeded, FarewayError, Internal, InvalidArgument, Unavailable

_MESSAGE_CHARS = 300
_INVALID = frozenset({400, 404, 413, 422})


@dataclass(frozen=True)
class Chunk:
    """What one streamed event brought."""

    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | None = None
    """The stop string that ended it, where the engine says (vLLM's `stop_reason`)."""
    usage: dict[str, Any] | None = None


def _message(body: str) -> str:
    """An upstream error's message, cut short: the upstream's words, never unbounded."""
    try:
        parsed = json.loads(body)
        error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
        text = error.get("message", error) if isinstance(error, dict) else error
        text = text if isinstance(text, str) else json.dumps(text)
    except ValueError:
        text = body
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."


def refusal(status: int, body: str, url: str) -> FarewayError:
    message = _message(body)
    if status in _INVALID:
        return InvalidArgument(f"the upstream engine refused the request ({status}): {message}")
    return Unavailable(f"the upstream engine at {url} answered {status}: {message}")


class UpstreamClient:
    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._session: aiohttp.ClientSession | None = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:   # made in the running loop, on first use
            self._session = aiohttp.ClientSession(
                headers=self._headers(), connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @contextlib.asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any], timeout_s: float | None) -> AsyncIterator[AsyncIterator[Chunk]]:
        """`POST {base}/{path}` with `stream: true`; inside the block the engine has taken the request, and
        what is yielded iterates its chunks. Leaving the block closes the connection."""
        url = f"{self.base_url}/{path}"
        try:
            async with asyncio.timeout(timeout_s):
                response = await self.session.post(url, json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}})
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed before the upstream engine answered") from None
        except aiohttp.ClientError as exc:
            raise Unavailable(f"the upstream engine at {self.base_url} cannot be reached: {exc}") from None
        try:
            if response.status != 200:
                raise refusal(response.status, (await response.read()).decode(errors="replace"), self.base_url)
            yield _chunks(response, timeout_s, self.base_url)
        finally:
            response.close()

    async def get_json(self, path: str, timeout_s: float = 5.0) -> Any:
        async with asyncio.timeout(timeout_s), self.session.get(f"{self.base_url}/{path}") as response:
            if response.status != 200:
                raise refusal(response.status, await response.text(), self.base_url)
            return await response.json(content_type=None)

    async def get_text(self, url: str, timeout_s: float = 5.0) -> str:
        async with asyncio.timeout(timeout_s), self.session.get(url) as response:
            if response.status != 200:
                raise refusal(response.status, await response.text(), url)
            return await response.text()


async def _chunks(response: aiohttp.ClientResponse, timeout_s: float | None, url: str) -> AsyncIterator[Chunk]:
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    try:
        async with asyncio.timeout_at(deadline):
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue   # blank lines between events, comments, event names
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                yield _chunk(json.loads(data), url)
    except TimeoutError:
        raise DeadlineExceeded("the request's deadline passed while the upstream engine generated") from None
    except (aiohttp.ClientError, ValueError) as exc:
        raise Internal(f"the upstream engine's stream broke: {_message(str(exc))}") from None


def _chunk(event: Any, url: str) -> Chunk:
    if not isinstance(event, dict):
        raise Internal(f"the upstream engine at {url} sent a stream event that is not an object")
    if "error" in event:
        raise Internal(f"the upstream engine failed while generating: {_message(json.dumps(event))}")
    usage = event.get("usage") if isinstance(event.get("usage"), dict) else None
    choices = event.get("choices") or []
    if not choices:
        return Chunk(usage=usage)
    choice = choices[0]
    delta = choice.get("delta")
    text = (delta.get("content") if isinstance(delta, dict) else None) or choice.get("text") or ""
    stop_reason = choice.get("stop_reason")
    return Chunk(text=text if isinstance(text, str) else "", finish_reason=choice.get("finish_reason"),
                 stop_reason=stop_reason if isinstance(stop_reason, str) else None, usage=usage)
