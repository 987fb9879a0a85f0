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
    ({**CHAT, "response_format": {"type": "xml"}}, "response_format"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": []}}, "response_format"),
    ({**CHAT, "structured_outputs": {"yaml": "x"}}, "structured_outputs"),
    ({**CHAT, "guided_choice": "yes"}, "guided_choice"),
    ({**CHAT, "guided_regex": "a", "guided_grammar": "root ::= \"a\""}, "guided_grammar"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({**CHAT, "logprobs": 3}, "logprobs"),
    ({**CHAT, "stop_token_ids": [1, "2"]}, "stop_token_ids"),
    ({**CHAT, "ignore_eos": 1}, "ignore_eos"),
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
    raw = writer.opening() + writer.text("Hi") + writer.text("!") + writer.closing(response)
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert [c["choices"][0]["delta"] for c in chunks[:4]] == [{"role": "assistant", "content": ""}, {"content": "Hi"},
                                                             {"content": "!"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "length"]
    assert chunks[4]["choices"] == [] and chunks[4]["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 2}}
    assert chunks[4]["fareway"]["gpu_seconds"] == 0.5
    # A replayed response is sent whole: its stored text and finish in one chunk.
    replay = openai_api.ChunkWriter("chat", "r1", "m", 1700000000, include_usage=False).closing(response, replayed=True)
    first = json.loads(replay.split(b"\n\n")[0][6:])
    assert first["choices"][0]["delta"] == {"content": "Hi!"} and first["choices"][0]["finish_reason"] == "length"
    assert {c["id"] for c in chunks} == {"chatcmpl-r1"} and {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_the_generation_parameters_map_to_fareways() -> None:
    s = openai_api.chat_request({**CHAT, "n": 3, "logprobs": True, "top_logprobs": 4, "prompt_logprobs": 1,
                                 "min_tokens": 2, "stop_token_ids": [7, 9], "ignore_eos": True,
                                 "response_format": {"type": "json_schema",
                                                     "json_schema": {"name": "p", "schema": {"type": "object"}}}}
                                ).message.sampling
    assert (s.n, s.logprobs, s.prompt_logprobs, s.min_tokens, list(s.stop_token_ids), s.ignore_eos) == (
        3, 4, 1, 2, [7, 9], True)
    assert json.loads(s.json_schema) == {"type": "object"}
    assert openai_api.chat_request({**CHAT, "logprobs": True}).message.sampling.logprobs == 0
    assert not openai_api.chat_request({**CHAT, "logprobs": False}).message.sampling.HasField("logprobs")
    assert openai_api.completion_request({"model": "m", "prompt": "x", "logprobs": 2}).message.sampling.logprobs == 2
    for body, kind, value in [
        ({"response_format": {"type": "json_object"}}, "json_object", True),
        ({"structured_outputs": {"regex": "[a-z]+"}}, "regex", "[a-z]+"),
        ({"structured_outputs": {"json": {"type": "array"}}}, "json_schema", '{"type": "array"}'),
        ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"'),
        ({"guided_json": '{"type": "integer"}'}, "json_schema", '{"type": "integer"}'),
    ]:
        sampling = openai_api.chat_request({**CHAT, **body}).message.sampling
        assert sampling.WhichOneof("structured_outputs") == kind and getattr(sampling, kind) == value
    choice = openai_api.chat_request({**CHAT, "guided_choice": ["yes", "no"]}).message.sampling
    assert list(choice.choice.choices) == ["yes", "no"]


def _logprob(token: str, value: float) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(token_id=ord(token[0]), token=token, logprob=value, rank=1, token_bytes=token.encode(),
                            top=[pb.TopLogprob(token_id=ord(token[0]), token=token, logprob=value,
                                               token_bytes=token.encode())])


def test_n_samples_and_logprobs_render_as_openais_choices() -> None:
    response = pb.GenerateResponse(request_id="r", model="m", text="Hi", usage=pb.Usage(completion_tokens=3), choices=[
        pb.Choice(index=0, text="Hi", finish_reason=pb.FINISH_REASON_STOP, logprobs=[_logprob("Hi", -0.5)]),
        pb.Choice(index=1, text="Yo!", finish_reason=pb.FINISH_REASON_LENGTH,
                  logprobs=[_logprob("Yo", -1.0), _logprob("!", -2.0)])])
    chat = openai_api.whole_response("chat", response, 0, with_logprobs=True)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in chat["choices"]] == [
        (0, "Hi", "stop"), (1, "Yo!", "length")]
    assert chat["choices"][1]["logprobs"]["content"][1] == {
        "token": "!", "logprob": -2.0, "bytes": [33], "top_logprobs": [{"token": "!", "logprob": -2.0, "bytes": [33]}]}
    text = openai_api.whole_response("text", response, 0, with_logprobs=True)
    assert text["choices"][1]["logprobs"] == {"tokens": ["Yo", "!"], "token_logprobs": [-1.0, -2.0],
                                              "top_logprobs": [{"Yo": -1.0}, {"!": -2.0}], "text_offset": [0, 2]}
    assert openai_api.whole_response("chat", response, 0)["choices"][0]["logprobs"] is None
    writer = openai_api.ChunkWriter("chat", "r", "m", 0, False, pb.SamplingParams(n=2, logprobs=0))
    opening = json.loads(writer.opening()[6:])
    assert [c["index"] for c in opening["choices"]] == [0, 1]
    chunk = json.loads(writer.text("Yo", 1, [_logprob("Yo", -1.0)], pb.FINISH_REASON_LENGTH)[6:])
    assert chunk["choices"][0]["index"] == 1 and chunk["choices"][0]["finish_reason"] == "length"
    assert chunk["choices"][0]["logprobs"]["content"][0]["token"] == "Yo"
    closing = writer.closing(response).split(b"\n\n")
    assert closing[0] == b"data: [DONE]"  # with n > 1 every sample finished in its own chunk
