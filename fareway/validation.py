"""Checks on generation requests that need no model: the gateway runs them
before dispatch and the worker again before admission, so both answer a bad
request with the same INVALID_ARGUMENT and field name. (The context-length
check needs the tokenizer and happens on the worker.)"""

from __future__ import annotations

import json
import math
import re
from typing import Protocol

from fareway.errors import InvalidArgument, shown
from fareway.inference.v1 import inference_pb2 as pb

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300
MAX_STOP_TOKEN_IDS = 64
MAX_SAMPLES = 16
"""SamplingParams.n at most."""
MAX_LOGPROBS = 20
MAX_CONSTRAINT_BYTES = 64 * 1024
MAX_CHOICES = 256
"""Tokens one request may bias (OpenAI's limit)."""
MAX_TAGS = 32
MAX_TAG_VALUE_CHARS = 256
# Matched whole (fullmatch): with `$`, a trailing newline would pass.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""request_id and session_id: printable, bounded, safe inside a Redis key and a log line."""
_TAG_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class HasInput(Protocol):
    """Any request with the `input` oneof (prompt or chat)."""

    prompt: str
    chat: pb.ChatMessages

    def WhichOneof(self, name: str) -> str | None: ...  # noqa: N802 - protobuf's name


def validate_input(request: HasInput) -> None:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("the request needs a prompt or chat messages", field="prompt")
    if kind == "prompt":
        if not request.prompt:
            raise InvalidArgument("prompt is empty", field="prompt")
        return
    validate_messages(request.chat.messages)


def validate_messages(messages: list[pb.ChatMessage]) -> None:
    if not messages:
        raise InvalidArgument("chat has no messages", field="chat.messages")
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidArgument(
                f"chat.messages[{i}].role is {shown(message.role)}; use one of {', '.join(sorted(CHAT_ROLES))}",
                field=f"chat.messages[{i}].role")
        if not message.content:
            raise InvalidArgument(f"chat.messages[{i}].content is empty", field=f"chat.messages[{i}].content")


def validate_sampling(sampling: pb.SamplingParams) -> None:
    if sampling.HasField("max_tokens") and sampling.max_tokens <= 0:
        raise InvalidArgument(f"max_tokens must be at least 1, got {sampling.max_tokens}",
                              field="sampling.max_tokens")
    if sampling.HasField("temperature") and not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        raise InvalidArgument(f"temperature must be 0 (greedy) or more, got {sampling.temperature:g}",
                              field="sampling.temperature")
    if sampling.HasField("top_p") and not (0 < sampling.top_p <= 1):
        raise InvalidArgument(f"top_p must be in (0, 1], got {sampling.top_p}", field="sampling.top_p")
    if sampling.top_k < 0:
        raise InvalidArgument(f"top_k must be 0 (off) or more, got {sampling.top_k}", field="sampling.top_k")
    if len(sampling.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(sampling.stop)}",
                              field="sampling.stop")
    _check_range(sampling, "min_p", 0.0, 1.0)
    _check_range(sampling, "presence_penalty", -2.0, 2.0)
    _check_range(sampling, "frequency_penalty", -2.0, 2.0)
    if sampling.HasField("repetition_penalty") and not 0 < sampling.repetition_penalty <= 2:
        raise InvalidArgument(f"repetition_penalty must be in (0, 2] (1 is off), got {sampling.repetition_penalty:g}",
                              field="sampling.repetition_penalty")
    if len(sampling.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument(f"logit_bias may bias at most {MAX_LOGIT_BIAS} tokens, got {len(sampling.logit_bias)}",
                              field="sampling.logit_bias")
    for token, bias in sampling.logit_bias.items():
        if not -100 <= bias <= 100:
            raise InvalidArgument(f"logit_bias values must be in [-100, 100], got {bias:g} for token {token}",
                                  field="sampling.logit_bias")
    for stop in sampling.stop:
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidArgument(f"stop strings must be 1-{MAX_STOP_CHARS} characters, got {shown(stop)}",
                                  field="sampling.stop")
    if sampling.HasField("min_tokens") and sampling.HasField("max_tokens") and sampling.min_tokens > sampling.max_tokens:
        raise InvalidArgument(f"min_tokens ({sampling.min_tokens}) must not exceed max_tokens ({sampling.max_tokens})",
                              field="sampling.min_tokens")
    if len(sampling.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(sampling.stop_token_ids)}",
                              field="sampling.stop_token_ids")
    if sampling.HasField("n") and not 1 <= sampling.n <= MAX_SAMPLES:
        raise InvalidArgument(f"n must be in [1, {MAX_SAMPLES}], got {sampling.n}", field="sampling.n")
    for name in ("logprobs", "prompt_logprobs"):
        if sampling.HasField(name) and getattr(sampling, name) > MAX_LOGPROBS:
            raise InvalidArgument(f"{name} must be in [0, {MAX_LOGPROBS}], got {getattr(sampling, name)}",
                                  field=f"sampling.{name}")
    _validate_constraint(sampling)


def _validate_constraint(sampling: pb.SamplingParams) -> None:
    """The structured-output constraint's shape (whether it compiles is the worker's to say)."""
    kind = sampling.WhichOneof("structured_outputs")
    field = f"sampling.{kind}"
    if kind is None:
        return
    if kind == "json_object":
        if not sampling.json_object:
            raise InvalidArgument("json_object must be true when set (leave it unset for free text)", field=field)
        return
    if kind == "choice":
        choices = sampling.choice.choices
        if not 1 <= len(choices) <= MAX_CHOICES:
            raise InvalidArgument(f"choice needs 1-{MAX_CHOICES} strings, got {len(choices)}", field=field)
        if any(not choice for choice in choices):
            raise InvalidArgument("choice strings must not be empty", field=field)
        size = sum(len(choice.encode()) for choice in choices)
    else:
        spec = getattr(sampling, kind)
        if not spec.strip():
            raise InvalidArgument(f"{kind} must not be empty", field=field)
        size = len(spec.encode())
    if size > MAX_CONSTRAINT_BYTES:
        raise InvalidArgument(f"{kind} is {size} bytes; a constraint takes at most {MAX_CONSTRAINT_BYTES}", field=field)
    if kind == "json_schema":
        try:
            schema = json.loads(sampling.json_schema)
        except ValueError as error:
            raise InvalidArgument(f"json_schema is not JSON: {shown(str(error))}", field=field) from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidArgument("json_schema must be a JSON Schema: an object (or true/false)", field=field)


def _check_range(sampling: pb.SamplingParams, name: str, least: float, most: float) -> None:
    if sampling.HasField(name) and not least <= getattr(sampling, name) <= most:
        raise InvalidArgument(f"{name} must be in [{least:g}, {most:g}], got {getattr(sampling, name):g}",
                              field=f"sampling.{name}")


def validate_generate(request: pb.GenerateRequest | pb.GenerateStreamRequest) -> None:
    """Everything about a GenerateRequest that can be checked without the model."""
    if not request.model:
        raise InvalidArgument("model is empty; ListModels names the models served", field="model")
    validate_input(request)
    validate_sampling(request.sampling)
    if request.request_id and not _REQUEST_ID.fullmatch(request.request_id):
        raise InvalidArgument("request_id must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'",
                              field="request_id")
    if request.session_id and not _REQUEST_ID.fullmatch(request.session_id):
        raise InvalidArgument("session_id must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'",
                              field="session_id")
    validate_tags(request.tags)


def validate_tags(tags: dict[str, str]) -> None:
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"at most {MAX_TAGS} tags, got {len(tags)}", field="tags")
    for key, value in tags.items():
        if not _TAG_KEY.fullmatch(key):
            raise InvalidArgument(f"tag name {shown(key)} must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'",
                                  field="tags")
        if len(value) > MAX_TAG_VALUE_CHARS:
            raise InvalidArgument(f"tag {shown(key)} is longer than {MAX_TAG_VALUE_CHARS} characters", field="tags")
