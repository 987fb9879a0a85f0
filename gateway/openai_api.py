"""The OpenAI wire format, translated to and from the InferenceService's messages.

Requests: a JSON body of `POST /v1/chat/completions` or `POST /v1/completions` becomes a
GenerateRequest (or GenerateStreamRequest), or InvalidArgument naming the parameter. A parameter
Fareway does not support yet is refused when it asks for something other than OpenAI's default,
and an unknown one is refused, so that nothing a caller asks for is silently ignored.

Responses: `chat.completion` / `text_completion` objects and their streamed chunks, with `usage`
as OpenAI defines it and Fareway's own figures (GPU-seconds, worker, hardware, timings) in one
extension object, `fareway`. Errors: OpenAI's `{"error": {...}}` shape with the HTTP status that
matches the gRPC status.

No sockets here: gateway/http_edge.py serves these over HTTP.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2

from fareway.errors import SHOWN_CHARS, FarewayError, InvalidArgument, shown
from fareway.inference.v1 import inference_pb2 as pb
from fareway.validation import MAX_LOGPROBS, MAX_SAMPLES
from gateway.run import Delta

MAX_MODEL_CHARS = 256
_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
_FLOAT_MAX = int(sys.float_info.max)
_LEAST_LOGPROB = -9999.0

_FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_STOP_SEQUENCE: "stop",
                   pb.FINISH_REASON_LENGTH: "length"}

# gRPC status -> (HTTP status, OpenAI error type).
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


@dataclass(frozen=True)
class OpenAIRequest:
    """A parsed request: the Fareway message, and how the answer is to be sent."""

    kind: str
    """"chat" or "text" (completions)."""
    message: pb.GenerateRequest | pb.GenerateStreamRequest
    stream: bool
    include_usage: bool
    """Streaming: a last chunk carries the usage (stream_options.include_usage)."""


# vLLM's older names for the structured-output constraints -> Fareway's.
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# vLLM's structured_outputs keys -> Fareway's.
_STRUCTURED = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
               "json_object": "json_object"}
# OpenAI's response_format types -> the keys each takes.
_RESPONSE_FORMATS = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Parameters Fareway takes, or refuses unless they ask for OpenAI's default: name -> that default
# test. A parameter in neither table is refused as unknown.
_AT_DEFAULT: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda v: v == 1,
    "top_logprobs": lambda v: v == 0,   # the chat API's; the completions API has logprobs for it
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "parallel_tool_calls": lambda v: isinstance(v, bool),   # only means something with tools
    "store": lambda v: v is False,
    "service_tier": lambda v: v in ("auto", "default"),
    "modalities": lambda v: v == ["text"],
    "prediction": lambda v: False,
    "audio": lambda v: False,
    "reasoning_effort": lambda v: False,
    "web_search_options": lambda v: False,
}
_COMMON = frozenset({"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "seed",
                     "stop", "user", "metadata", "session_id", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "logit_bias", "n", "logprobs", "prompt_logprobs", "min_tokens",
                     "stop_token_ids", "ignore_eos", "response_format", "structured_outputs", *_GUIDED})
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
_TEXT = _COMMON | {"prompt"}


def chat_request(body: Mapping[str, Any]) -> OpenAIRequest:
    """A `POST /v1/chat/completions` body."""
    stream, include_usage = _check_parameters(body, _CHAT)
    message = (pb.GenerateStreamRequest if stream else pb.GenerateRequest)()
    message.chat.messages.extend(_messages(body.get("messages")))
    max_tokens = body.get("max_completion_tokens")
    _fill(message, body, "max_completion_tokens" if max_tokens is not None else "max_tokens")
    logprobs = _typed(body, "logprobs", bool)
    top_logprobs = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top_logprobs and not logprobs:   # as OpenAI (0 asks for nothing, as vLLM lets it)
        raise InvalidArgument("top_logprobs needs logprobs: true", field="top_logprobs")
    if logprobs:
        message.sampling.logprobs = top_logprobs or 0
    return OpenAIRequest("chat", message, stream, include_usage)


def completion_request(body: Mapping[str, Any]) -> OpenAIRequest:
    """A `POST /v1/completions` body."""
    stream, include_usage = _check_parameters(body, _TEXT)
    message = (pb.GenerateStreamRequest if stream else pb.GenerateRequest)()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt must be a string (one prompt per request; token ids are not taken yet)",
                              field="prompt")
    message.prompt = _text(prompt, "prompt")
    _fill(message, body, "max_tokens")
    # The completions API's logprobs: how many likely tokens per position (OpenAI's 0-5, vLLM's 0-20); false,
    # as some clients send it, is none.
    if body.get("logprobs") is not False and (logprobs := _integer(body, "logprobs", 0, MAX_LOGPROBS)) is not None:
        message.sampling.logprobs = logprobs
    return OpenAIRequest("text", message, stream, include_usage)


def _check_parameters(body: Mapping[str, Any], known: frozenset[str]) -> tuple[bool, bool]:
    """Refuses unknown parameters and unsupported ones that are not at their default; (stream, include_usage)."""
    for name, value in body.items():
        if name in known or value is None:
            continue
        if name not in _AT_DEFAULT:
            raise InvalidArgument(f"unknown parameter {shown(name)}", field=_param(name))
        if not _AT_DEFAULT[name](value):
            raise InvalidArgument(f"{name} is not supported by Fareway yet; leave it out or at its default",
                                  field=name)
    stream = _typed(body, "stream", bool) or False
    options = _typed(body, "stream_options", dict) or {}
    if options and not stream:
        raise InvalidArgument("stream_options is only for stream: true", field="stream_options")
    for name in options:
        if name != "include_usage":
            raise InvalidArgument(f"unknown stream option {shown(name)}", field="stream_options")
    include_usage = _typed(options, "include_usage", bool, "stream_options.include_usage") or False
    return stream, include_usage


def _messages(value: Any) -> list[pb.ChatMessage]:
    if not isinstance(value, list) or not value:
        raise InvalidArgument("messages must be a non-empty list of {role, content} objects", field="messages")
    messages = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(f"{where} must be an object with role and content", field=where)
        for name in item:
            if name not in ("role", "content"):
                raise InvalidArgument(f"{where}.{_param(name)} is not supported by Fareway yet",
                                      field=f"{where}.{_param(name)}")
        role = item.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant", "tool"):
            raise InvalidArgument(f"{where}.role is {shown(role)}; use system, developer, user, assistant or tool",
                                  field=f"{where}.role")
        messages.append(pb.ChatMessage(role=role, content=_content(item.get("content"), where)))
    return messages


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined with newlines)."""
    if isinstance(value, str):
        return _text(value, f"{where}.content")
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidArgument(f"{where}.content[{j}] must be a text part, {{\"type\": \"text\", \"text\": ...}}; "
                                      "Fareway serves text models", field=f"{where}.content[{j}]")
            texts.append(_text(part["text"], f"{where}.content[{j}].text"))
        return "\n".join(texts)
    raise InvalidArgument(f"{where}.content must be a string or a list of text parts", field=f"{where}.content")


def _fill(message: pb.GenerateRequest | pb.GenerateStreamRequest, body: Mapping[str, Any], max_tokens_name: str) -> None:
    """The parameters both endpoints share."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("model must be a model's name; GET /v1/models lists them", field="model")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidArgument(f"model is longer than {MAX_MODEL_CHARS} characters", field="model")
    message.model = _text(model, "model")
    sampling = message.sampling
    if (max_tokens := _integer(body, max_tokens_name, 1, _INT32_MAX)) is not None:
        sampling.max_tokens = max_tokens
    if (temperature := _number(body, "temperature")) is not None:
        sampling.temperature = temperature
    if (top_p := _number(body, "top_p")) is not None:
        sampling.top_p = top_p
    if (top_k := _integer(body, "top_k", -1, _INT32_MAX)) is not None:
        sampling.top_k = max(top_k, 0)   # vLLM's -1 is off, as Fareway's 0
    if (seed := _integer(body, "seed", 0, _UINT64_MAX)) is not None:
        sampling.seed = seed
    for name in ("min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if (value := _number(body, name)) is not None:
            setattr(sampling, name, value)
    if (bias := _typed(body, "logit_bias", dict)) is not None:
        for token, value in bias.items():
            if not (isinstance(token, str) and token.isdigit() and int(token) <= _INT32_MAX):
                raise InvalidArgument(f"logit_bias keys must be token ids (\"50256\"), got {shown(token)}",
                                      field="logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidArgument(f"logit_bias values must be numbers, got {shown(value)}", field="logit_bias")
            sampling.logit_bias[int(token)] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise InvalidArgument("stop must be a string or a list of strings", field="stop")
        sampling.stop.extend(_text(s, "stop") for s in stop)
    metadata = _typed(body, "metadata", dict) or {}
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise InvalidArgument(f"metadata values must be strings; {shown(key)} is not", field="metadata")
        message.tags[_text(key, "metadata")] = _text(value, "metadata")
    if (user := _typed(body, "user", str)) is not None:
        message.tags["user"] = _text(user, "user")
    if (session_id := _typed(body, "session_id", str)) is not None:
        message.session_id = _text(session_id, "session_id")
    if (n := _integer(body, "n", 1, MAX_SAMPLES)) is not None:
        sampling.n = n   # OpenAI takes up to 128; Fareway's proto, 16
    if (prompt_logprobs := _integer(body, "prompt_logprobs", 0, MAX_LOGPROBS)) is not None:
        sampling.prompt_logprobs = prompt_logprobs
    if (min_tokens := _integer(body, "min_tokens", 0, _UINT32_MAX)) is not None:
        sampling.min_tokens = min_tokens
    if (stop_tokens := body.get("stop_token_ids")) is not None:
        if not (isinstance(stop_tokens, list) and all(_is_token_id(t) for t in stop_tokens)):
            raise InvalidArgument(f"stop_token_ids must be a list of token ids (integers from 0 to {_UINT32_MAX})",
                                  field="stop_token_ids")
        sampling.stop_token_ids.extend(stop_tokens)
    if (ignore_eos := _typed(body, "ignore_eos", bool)) is not None:
        sampling.ignore_eos = ignore_eos
    _fill_constraint(sampling, body)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _UINT32_MAX


def _fill_constraint(sampling: pb.SamplingParams, body: Mapping[str, Any]) -> None:
    """OpenAI's response_format, vLLM's structured_outputs and its older guided_* parameters: at most one
    constraint, whichever parameter names it. (Whether it compiles is the worker's to say.)"""
    found: list[tuple[str, str, Any]] = []   # (the parameter, Fareway's kind, its value)
    if (response_format := body.get("response_format")) is not None:
        found += _response_format(response_format)
    if (structured := _typed(body, "structured_outputs", dict)) is not None:
        for key, value in structured.items():
            if key not in _STRUCTURED:
                raise InvalidArgument(f"structured_outputs.{_param(key)} is not supported by Fareway; it takes one of "
                                      f"{', '.join(_STRUCTURED)}", field=f"structured_outputs.{_param(key)}")
            if value is not None and value is not False:   # json_object: false asks for nothing
                found.append((f"structured_outputs.{key}", _STRUCTURED[key], value))
    found += [(name, kind, body[name]) for name, kind in _GUIDED.items() if body.get(name) is not None]
    if len(found) > 1:
        raise InvalidArgument(f"one structured-output constraint per request; got {found[0][0]} and {found[1][0]}",
                              field=found[1][0])
    if found:
        _set_constraint(sampling, *found[0])


def _response_format(value: Any) -> list[tuple[str, str, Any]]:
    """OpenAI's response_format as the constraint it asks for (none for text)."""
    if not isinstance(value, dict) or value.get("type") not in _RESPONSE_FORMATS:
        raise InvalidArgument('response_format must be {"type": "text"}, {"type": "json_object"} or '
                              '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
                              field="response_format")
    kind = value["type"]
    _only_keys(value, _RESPONSE_FORMATS[kind], "response_format", f"response_format of type {kind}")
    if kind == "text":
        return []
    if kind == "json_object":
        return [("response_format", "json_object", True)]
    where = "response_format.json_schema"
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidArgument(f'{where} must be an object, {{"name": ..., "schema": {{...}}}}', field=where)
    _only_keys(spec, {"name", "description", "schema", "strict"}, where)
    name = spec.get("name")
    if not (isinstance(name, str) and _SCHEMA_NAME.fullmatch(name)):
        raise InvalidArgument(f"{where}.name must be 1-64 characters of a-z, A-Z, 0-9, '_' and '-'",
                              field=f"{where}.name")
    for key, kind_of in (("description", str), ("strict", bool)):
        _typed(spec, key, kind_of, f"{where}.{key}")
    if not isinstance(spec.get("schema"), dict):
        raise InvalidArgument(f"{where}.schema must be a JSON Schema: an object", field=f"{where}.schema")
    return [(f"{where}.schema", "json_schema", spec["schema"])]


def _only_keys(value: Mapping[str, Any], allowed: set[str], where: str, described: str = "") -> None:
    for key in value:
        if key not in allowed:
            raise InvalidArgument(f"{described or where} takes only {', '.join(sorted(allowed))}, not {shown(key)}",
                                  field=f"{where}.{_param(key)}")


def _set_constraint(sampling: pb.SamplingParams, name: str, kind: str, value: Any) -> None:
    """Sets the structured_outputs oneof from the parameter `name`, refusing a value of the wrong type."""
    if kind == "json_schema":
        if isinstance(value, (dict, bool)):   # vLLM takes a schema as an object or as JSON text
            try:
                value = json.dumps(value, ensure_ascii=False)
            except RecursionError:   # nested just short of what the body's parser takes, a few calls deeper
                raise InvalidArgument(f"{name} nests objects too deeply", field=name) from None
        if not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a JSON Schema: an object, or JSON text", field=name)
        sampling.json_schema = _text(value, name)
    elif kind == "json_object":
        if value is not True:
            raise InvalidArgument(f"{name} must be true (leave it out for free text)", field=name)
        sampling.json_object = True
    elif kind == "choice":
        if not (isinstance(value, list) and all(isinstance(c, str) for c in value)):
            raise InvalidArgument(f"{name} must be a list of strings", field=name)
        sampling.choice.choices.extend(_text(c, name) for c in value)
    else:
        if not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a string", field=name)
        setattr(sampling, kind, _text(value, name))


def _text(value: str, name: str) -> str:
    """A string of the body as a protobuf string can hold it. JSON's escapes can spell lone surrogates
    ("\\ud800"), which are no Unicode text: refused, naming the parameter."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"{name} is not Unicode text: it holds a lone surrogate ({shown(value)})",
                              field=name) from None
    return value


def _param(name: str) -> str:
    """A parameter's name from the body as an error may name it: cut short, lone surrogates escaped."""
    return name[:SHOWN_CHARS].encode("utf-8", "backslashreplace").decode()


def _typed(body: Mapping[str, Any], name: str, kind: type, shown_as: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        article = {"bool": "a boolean", "dict": "an object", "str": "a string"}[kind.__name__]
        raise InvalidArgument(f"{shown_as or name} must be {article}", field=shown_as or name)
    return value


def _integer(body: Mapping[str, Any], name: str, least: int, most: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value <= most:
        raise InvalidArgument(f"{name} must be an integer from {least} to {most}", field=name)
    return value


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) <= _FLOAT_MAX else math.inf  # float(10**400) would raise
    if not isinstance(value, float) or not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number", field=name)
    return value


# Responses.

def response_id(kind: str, request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"


def usage(u: pb.Usage) -> dict[str, Any]:
    """OpenAI's usage object."""
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def fareway_extension(request_id: str, u: pb.Usage) -> dict[str, Any]:
    """What Fareway adds to a response: where it ran, what it cost in device time, how long it took."""
    return {"request_id": request_id, "worker": u.worker_id, "hardware_class": u.hardware_class,
            "device_count": u.device_count, "gpu_seconds": u.gpu_seconds, "queue_ms": round(u.queue_ms, 3),
            "ttft_ms": round(u.ttft_ms, 3), "total_ms": round(u.total_ms, 3), "metering": u.metering,
            "token_source": u.token_source}


def finish_reason(response: pb.GenerateResponse | pb.Choice) -> str:
    return _FINISH_REASONS.get(response.finish_reason, "stop")


def choices_of(response: pb.GenerateResponse) -> list[pb.Choice]:
    """Every sample of a response, by index: its choices with n > 1, else the one its own fields hold."""
    if response.choices:
        return sorted(response.choices, key=lambda c: c.index)
    return [pb.Choice(index=0, text=response.text, token_ids=response.token_ids, finish_reason=response.finish_reason,
                      stop_sequence=response.stop_sequence, logprobs=response.logprobs)]


def _logprob(value: float) -> float:
    """A log-probability as JSON can carry it: -inf (or NaN) as vLLM's -9999."""
    return value if value >= _LEAST_LOGPROB else _LEAST_LOGPROB


def chat_logprobs(positions: Sequence[pb.TokenLogprobs]) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object: per token its text, log-probability, UTF-8 bytes and top_logprobs."""
    return {"content": [{"token": p.token, "logprob": _logprob(p.logprob), "bytes": list(p.token_bytes),
                         "top_logprobs": [{"token": t.token, "logprob": _logprob(t.logprob), "bytes": list(t.token_bytes)}
                                          for t in p.top]} for p in positions],
            "refusal": None}


def text_logprobs(positions: Sequence[pb.TokenLogprobs], offset: int = 0) -> dict[str, Any]:
    """The completions API's `logprobs` object: tokens, token_logprobs, top_logprobs (the likeliest tokens and
    the chosen one, so up to logprobs + 1, as OpenAI and vLLM) and text_offset (`offset`: where the first
    token starts in the choice's text)."""
    offsets, top_logprobs = [], []
    for p in positions:
        offsets.append(offset)
        offset += len(p.token)
        top = {t.token: _logprob(t.logprob) for t in p.top}
        top.setdefault(p.token, _logprob(p.logprob))
        top_logprobs.append(top)
    return {"tokens": [p.token for p in positions], "token_logprobs": [_logprob(p.logprob) for p in positions],
            "top_logprobs": top_logprobs, "text_offset": offsets}


def prompt_logprobs(positions: Sequence[pb.TokenLogprobs]) -> list[dict[str, Any] | None]:
    """vLLM's prompt_logprobs: None for the first prompt token (nothing comes before it), then per token
    {token id: {logprob, rank, decoded_token}} for its likeliest tokens and the token itself."""
    out: list[dict[str, Any] | None] = [None]
    for p in positions:
        entry = {str(t.token_id): {"logprob": _logprob(t.logprob), "rank": rank, "decoded_token": t.token}
                 for rank, t in enumerate(p.top, start=1)}
        entry[str(p.token_id)] = {"logprob": _logprob(p.logprob), "rank": p.rank, "decoded_token": p.token}
        out.append(entry)
    return out


def whole_response(kind: str, response: pb.GenerateResponse, created: int,
                   sampling: pb.SamplingParams | None = None) -> dict[str, Any]:
    """The `chat.completion` or `text_completion` object of a finished request: a choice per sample, with
    logprobs (and prompt_logprobs: the response's in chat, as vLLM's, each choice's in completions) when
    `sampling`, the request's, asked for them."""
    sampling = sampling or pb.SamplingParams()
    with_logprobs = sampling.HasField("logprobs")
    prompt = prompt_logprobs(response.prompt_logprobs) if sampling.HasField("prompt_logprobs") else None
    choices: list[dict[str, Any]] = []
    for c in choices_of(response):
        if kind == "chat":
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": chat_logprobs(c.logprobs) if with_logprobs else None,
                            "finish_reason": finish_reason(c)})
        else:
            choices.append({"index": c.index, "text": c.text,
                            "logprobs": text_logprobs(c.logprobs) if with_logprobs else None,
                            "finish_reason": finish_reason(c),
                            **({"prompt_logprobs": prompt} if prompt is not None else {})})
    obj = {"id": response_id(kind, response.request_id), "object": "chat.completion" if kind == "chat" else
           "text_completion", "created": created, "model": response.model, "choices": choices,
           "usage": usage(response.usage), "fareway": fareway_extension(response.request_id, response.usage)}
    if kind == "chat" and prompt is not None:
        obj["prompt_logprobs"] = prompt
    return obj


class ChunkWriter:
    """The chunks of one streamed response, as server-sent events (`data: {...}\\n\\n`): each carries one
    sample's choice, by its index."""

    def __init__(self, kind: str, request_id: str, model: str, created: int, include_usage: bool,
                 sampling: pb.SamplingParams | None = None) -> None:
        self.kind = kind
        self.include_usage = include_usage
        sampling = sampling or pb.SamplingParams()
        self.num_samples = sampling.n if sampling.HasField("n") else 1
        self.with_logprobs = sampling.HasField("logprobs")
        self.with_prompt_logprobs = sampling.HasField("prompt_logprobs")
        self._text_offsets: dict[int, int] = {}
        """Completions: where each sample's next token starts in its text (logprobs' text_offset)."""
        self._finished: set[int] = set()
        self._head = {"id": response_id(kind, request_id), "created": created, "model": model,
                      "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({**self._head, "choices": choices, **extra})

    def _choice(self, index: int, text: str | None, reason: str | None, logprobs: Sequence[pb.TokenLogprobs] = (),
                first: bool = False) -> dict[str, Any]:
        rendered = None
        if self.with_logprobs and logprobs:
            if self.kind == "chat":
                rendered = chat_logprobs(logprobs)
            else:
                offset = self._text_offsets.get(index, 0)
                rendered = text_logprobs(logprobs, offset)
                self._text_offsets[index] = offset + sum(len(p.token) for p in logprobs)
        if reason is not None:
            self._finished.add(index)
        if self.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            return {"index": index, "delta": delta, "logprobs": rendered, "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": rendered, "finish_reason": reason}

    def _prompt_event(self, choices: list[dict[str, Any]], positions: Sequence[pb.TokenLogprobs]) -> bytes:
        """An event of `choices` with the prompt_logprobs, when asked for and these came: on the chunk in chat,
        on each choice in completions, as in the whole response."""
        if not (self.with_prompt_logprobs and positions):
            return self._event(choices)
        rendered = prompt_logprobs(positions)
        if self.kind == "chat":
            return self._event(choices, prompt_logprobs=rendered)
        return self._event([{**c, "prompt_logprobs": rendered} for c in choices])

    def opening(self) -> bytes:
        """The first chunk: the assistant's role (chat) for every sample, before any text."""
        if self.kind != "chat":
            return b""
        return self._event([self._choice(i, "", None, first=True) for i in range(self.num_samples)])

    def delta(self, delta: Delta) -> bytes:
        """New text of one sample, with its logprobs; with n > 1, its finish reason when it has finished."""
        reason = _FINISH_REASONS.get(delta.finish_reason, "stop") if delta.finish_reason else None
        text = None if reason is not None and not delta.text else delta.text
        return self._prompt_event([self._choice(delta.index, text, reason, delta.logprobs)], delta.prompt_logprobs)

    def closing(self, response: pb.GenerateResponse, replayed: bool = False) -> bytes:
        """The last chunks: the finish reason of each sample that has not had its own (all of a replayed
        response, sent whole: its stored text, logprobs and finish), the usage when asked for, and `[DONE]`."""
        out = []
        if replayed:
            out.append(self._prompt_event([self._choice(c.index, c.text or None, finish_reason(c), c.logprobs)
                                           for c in choices_of(response)], response.prompt_logprobs))
        for c in choices_of(response):
            if c.index not in self._finished:
                out.append(self._event([self._choice(c.index, None, finish_reason(c))]))
        if self.include_usage:
            out.append(self._event([], usage=usage(response.usage),
                                   fareway=fareway_extension(response.request_id, response.usage)))
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)


def sse(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


# Errors.

@dataclass(frozen=True)
class HttpError:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def http_error(error: FarewayError) -> HttpError:
    """OpenAI's error object for a Fareway error, its HTTP status, and Retry-After where the error says
    when to retry."""
    status, kind = _HTTP_STATUS.get(error.code, (500, "server_error"))
    # A worker's refusal names its field in the status details (the gateway passed it on).
    param = getattr(error, "field", None) or next(
        (v.field for d in error.details if isinstance(d, error_details_pb2.BadRequest) for v in d.field_violations), None)
    if param:
        param = _openai_param(param)
    code = error.code.name.lower()
    headers: dict[str, str] = {}
    for detail in error.details:
        if isinstance(detail, error_details_pb2.RetryInfo):
            seconds = detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9
            headers["Retry-After"] = str(max(1, math.ceil(seconds)))
        if isinstance(detail, error_details_pb2.QuotaFailure) and any(
                "budget" in v.subject for v in detail.violations):
            code = "insufficient_quota"
    if status == 503 and "Retry-After" not in headers:
        headers["Retry-After"] = "1"
    return HttpError(status, {"error": {"message": error.message, "type": kind, "param": param, "code": code}},
                     headers)


def _openai_param(field: str) -> str:
    """A Fareway field name as the OpenAI parameter it came from: sampling.max_tokens -> max_tokens (and the
    request_id, the Idempotency-Key header)."""
    for prefix, replacement in (("sampling.", ""), ("chat.messages", "messages"), ("tags", "metadata"),
                                ("request_id", "Idempotency-Key")):
        if field.startswith(prefix):
            return replacement + field[len(prefix):]
    return field


def models_list(models: list[pb.Model]) -> dict[str, Any]:
    """`GET /v1/models`."""
    return {"object": "list", "data": [model_object(m) for m in models]}


def model_object(model: pb.Model) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": 0, "owned_by": "fareway",
            "fareway": {"context_length": model.context_length, "hardware_classes": list(model.hardware_classes),
                        "num_workers": model.num_workers}}
