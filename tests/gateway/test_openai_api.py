"""The OpenAI wire format's translation, without sockets: every parameter Fareway takes lands where it
should, and what it does not take is refused by name."""

from __future__ import annotations

import json

import grpc
import pytest
from google.rpc import error_details_pb2

from fareway.errors import InvalidArgument, ResourceExhausted, Unavailable
from fareway.inference.v1 import inference_pb2 as pb
from gateway import openai_api

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_parameters_map_to_fareways() -> None:
    parsed = openai_api.chat_request({
        **CHAT, "messages": [{"role": "developer", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                             {"role": "assistant", "content": "ok"}],
        "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": 3,
        "stop": "END", "metadata": {"feature": "faq"}, "user": "u1", "session_id": "s1",
        "n": 1, "presence_penalty": 0, "logprobs": False, "response_format": {"type": "text"}, "tool_choice": None,
        "stream": True, "stream_options": {"include_usage": True}})
    message = parsed.message
    assert isinstance(message, pb.GenerateStreamRequest) and (parsed.kind, parsed.include_usage) == ("chat", True)
    assert [(m.role, m.content) for m in message.chat.messages] == [
        ("system", "Be brief."), ("user", "a\nb"), ("assistant", "ok")]
    s = message.sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.seed, list(s.stop)) == (7, 0.5, 0, 3, ["END"])
    assert s.top_p == pytest.approx(0.9)
    assert dict(message.tags) == {"feature": "faq", "user": "u1"} and message.session_id == "s1"


def test_penalties_min_p_and_logit_bias_map_to_fareways() -> None:
    s = openai_api.chat_request({**CHAT, "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2,
                                 "min_p": 0.05, "logit_bias": {"50256": -100, "13": 2.5}}).message.sampling
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -1.0)
    assert (s.repetition_penalty, s.min_p) == (pytest.approx(1.2), pytest.approx(0.05))
    assert dict(s.logit_bias) == {50256: -100.0, 13: 2.5}


def test_unset_parameters_stay_unset_for_fareways_defaults() -> None:
    parsed = openai_api.completion_request({"model": "m", "prompt": ["once"], "temperature": None})
    message = parsed.message
    assert isinstance(message, pb.GenerateRequest) and not parsed.stream and message.prompt == "once"
    assert not message.sampling.HasField("max_tokens") and not message.sampling.HasField("temperature")


@pytest.mark.parametrize("body, field", [
    ({**CHAT, "best_of": 2}, "best_of"),
    ({**CHAT, "logit_bias": {"a": 5}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"1": "5"}}, "logit_bias"),
    ({**CHAT, "presence_penalty": float("nan")}, "presence_penalty"),
    ({**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ({**CHAT, "audio": {}}, "audio"),
    ({**CHAT, "messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ({**CHAT, "seed": -1}, "seed"),
    ({**CHAT, "top_p": float("inf")}, "top_p"),
    ({**CHAT, "max_tokens": True}, "max_tokens"),
    ({**CHAT, "max_tokens": 2**31}, "max_tokens"),
    ({**CHAT, "metadata": {"k": 1}}, "metadata"),
    ({**CHAT, "stop": [1]}, "stop"),
    ({**CHAT, "stream": True, "stream_options": {"chunk": 1}}, "stream_options"),
    ({"messages": CHAT["messages"]}, "model"),
])
def test_what_fareway_does_not_take_is_refused_by_name(body: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        openai_api.chat_request(body)
    assert refused.value.field == field


@pytest.mark.parametrize("body, field", [
    ({**CHAT, "messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages[0].content[0].text"),
    ({**CHAT, "model": "m\ud800"}, "model"),
    ({**CHAT, "stop": ["\ud800"]}, "stop"),
    ({**CHAT, "metadata": {"\ud800": "v"}}, "metadata"),
    ({**CHAT, "metadata": {"k": "\ud800"}}, "metadata"),
    ({**CHAT, "user": "\ud800"}, "user"),
    ({**CHAT, "session_id": "\ud800"}, "session_id"),
    ({**CHAT, "\ud800": 1}, "\\ud800"),
    ({**CHAT, "messages": [{"role": "user", "content": "hi", "\ud800": 1}]}, "messages[0].\\ud800"),
])
def test_lone_surrogates_are_refused_by_name_in_an_error_that_can_be_sent(body: dict, field: str) -> None:
    """JSON's \\ud800 escapes spell lone surrogates, which no protobuf string holds: refused naming the parameter,
    in an error that encodes (they were a 500)."""
    with pytest.raises(InvalidArgument) as refused:
        openai_api.chat_request(body)
    assert refused.value.field == field
    error = openai_api.http_error(refused.value)
    assert error.status == 400 and json.dumps(error.body, ensure_ascii=False).encode()
    assert openai_api.http_error(refused.value).body["error"]["param"] == field


def test_a_number_too_large_for_a_float_is_refused_by_name() -> None:
    for name in ("temperature", "top_p"):
        with pytest.raises(InvalidArgument) as refused:   # an OverflowError (a 500) before
            openai_api.completion_request({"model": "m", "prompt": "hi", name: 10**400})
        assert refused.value.field == name


def test_errors_take_openais_shape_status_and_retry_after() -> None:
    limited = openai_api.http_error(ResourceExhausted("slow down", subject="team:a", retry_after_s=2.2))
    assert (limited.status, limited.headers) == (429, {"Retry-After": "3"})
    assert limited.body == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                                      "code": "resource_exhausted"}}
    budget = openai_api.http_error(ResourceExhausted("over budget", subject="budget:a"))
    assert budget.body["error"]["code"] == "insufficient_quota"
    bad = openai_api.http_error(InvalidArgument("no", field="sampling.max_tokens"))
    assert (bad.status, bad.body["error"]["param"]) == (400, "max_tokens")
    assert openai_api.http_error(InvalidArgument("no", field="request_id")).body["error"]["param"] == "Idempotency-Key"
    assert openai_api.http_error(Unavailable("later")).headers == {"Retry-After": "1"}
    assert isinstance(ResourceExhausted("x", retry_after_s=1).details[1], error_details_pb2.RetryInfo)
    for code, status in ((grpc.StatusCode.UNAUTHENTICATED, 401), (grpc.StatusCode.PERMISSION_DENIED, 403),
                         (grpc.StatusCode.NOT_FOUND, 404), (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
                         (grpc.StatusCode.INTERNAL, 500)):
        error = InvalidArgument("x")
        error.code = code
        assert openai_api.http_error(error).status == status


def test_a_stream_is_opened_by_the_role_and_closed_by_the_finish_the_usage_and_done() -> None:
    writer = openai_api.ChunkWriter("chat", "r1", "m", 1700000000, include_usage=True)
    response = pb.GenerateResponse(request_id="r1", model="m", text="Hi!", finish_reason=pb.FINISH_REASON_LENGTH,
                                   usage=pb.Usage(prompt_tokens=4, cached_tokens=2, completion_tokens=3, gpu_seconds=0.5))
    raw = writer.opening() + writer.text("Hi") + writer.closing(response, "!")
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [{"role": "assistant", "content": ""}, {"content": "Hi"},
                                                             {"content": "!"}]
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 2}}
    assert chunks[3]["fareway"]["gpu_seconds"] == 0.5
    assert {c["id"] for c in chunks} == {"chatcmpl-r1"} and {c["object"] for c in chunks} == {"chat.completion.chunk"}
