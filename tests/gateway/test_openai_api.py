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
from gateway.run import Delta

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
    ({**CHAT, "guided_regex": "\ud800"}, "guided_regex"),
    ({**CHAT, "structured_outputs": {"choice": ["a", "\ud800"]}}, "structured_outputs.choice"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"\ud800": 1}}}},
     "response_format.json_schema.schema"),
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
    raw = writer.opening() + writer.delta(Delta("Hi", (1,))) + writer.delta(Delta("!", (2,))) + writer.closing(response)
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
                                 "min_tokens": 2, "stop_token_ids": [7, 9], "ignore_eos": True, "seed": 11,
                                 "response_format": {"type": "json_schema", "json_schema": {
                                     "name": "person-1", "description": "d", "strict": True,
                                     "schema": {"type": "object"}}}}).message.sampling
    assert (s.n, s.logprobs, s.prompt_logprobs, s.min_tokens, list(s.stop_token_ids), s.ignore_eos, s.seed) == (
        3, 4, 1, 2, [7, 9], True, 11)
    assert json.loads(s.json_schema) == {"type": "object"}
    assert openai_api.chat_request({**CHAT, "n": 16}).message.sampling.n == 16
    assert openai_api.chat_request({**CHAT, "logprobs": True}).message.sampling.logprobs == 0
    for body in ({"logprobs": False}, {"top_logprobs": 0}, {"response_format": {"type": "text"}},
                 {"structured_outputs": {"json_object": False}}, {"n": None, "min_tokens": None}):
        sampling = openai_api.chat_request({**CHAT, **body}).message.sampling
        assert sampling == pb.SamplingParams(), body   # asks for nothing: nothing set
    text = openai_api.completion_request({"model": "m", "prompt": "x", "logprobs": 2, "n": 2}).message.sampling
    assert (text.logprobs, text.n) == (2, 2)
    assert not openai_api.completion_request({"model": "m", "prompt": "x", "logprobs": False}
                                             ).message.sampling.HasField("logprobs")


@pytest.mark.parametrize("body, kind, value", [
    ({"response_format": {"type": "json_object"}}, "json_object", True),
    ({"structured_outputs": {"json_object": True}}, "json_object", True),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "regex", "[a-z]+"),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar", 'root ::= "a"'),
    ({"structured_outputs": {"json": {"type": "array"}}}, "json_schema", {"type": "array"}),
    ({"structured_outputs": {"json": '{"type": "array"}', "regex": None}}, "json_schema", {"type": "array"}),
    ({"guided_json": {"enum": ["é"]}}, "json_schema", {"enum": ["é"]}),
    ({"guided_json": '{"type": "integer"}'}, "json_schema", {"type": "integer"}),
    ({"guided_regex": "\\d+"}, "regex", "\\d+"),
    ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"'),
    ({"guided_choice": ["yes", "no"]}, "choice", ["yes", "no"]),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "text"}}, "choice", ["a"]),
])
def test_each_way_of_naming_a_constraint_sets_fareways_one(body: dict, kind: str, value: object) -> None:
    for parse, base in ((openai_api.chat_request, CHAT), (openai_api.completion_request, {"model": "m", "prompt": "x"})):
        sampling = parse({**base, **body}).message.sampling
        assert sampling.WhichOneof("structured_outputs") == kind
        got = getattr(sampling, kind)
        if kind == "json_schema":
            got = json.loads(got)
        elif kind == "choice":
            got = list(got.choices)
        assert got == value


SCHEMA = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}


@pytest.mark.parametrize("body, field, words", [
    ({"n": 0}, "n", "n must be an integer from 1 to 16"),
    ({"n": 17}, "n", "from 1 to 16"),
    ({"n": 128}, "n", "from 1 to 16"),
    ({"n": "2"}, "n", "from 1 to 16"),
    ({"n": 1.5}, "n", "from 1 to 16"),
    ({"logprobs": 3}, "logprobs", "logprobs must be a boolean"),
    ({"logprobs": "true"}, "logprobs", "logprobs must be a boolean"),
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "from 0 to 20"),
    ({"logprobs": True, "top_logprobs": True}, "top_logprobs", "from 0 to 20"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "from 0 to 20"),
    ({"prompt_logprobs": -1}, "prompt_logprobs", "from 0 to 20"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens must be an integer from 0"),
    ({"min_tokens": "3"}, "min_tokens", "min_tokens must be an integer"),
    ({"stop_token_ids": 5}, "stop_token_ids", "must be a list of token ids"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids", "must be a list of token ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "must be a list of token ids"),
    ({"stop_token_ids": [True]}, "stop_token_ids", "must be a list of token ids"),
    ({"stop_token_ids": [2**32]}, "stop_token_ids", "must be a list of token ids"),
    ({"ignore_eos": 1}, "ignore_eos", "ignore_eos must be a boolean"),
    ({"response_format": "json"}, "response_format", 'response_format must be {"type": "text"}'),
    ({"response_format": {"type": "xml"}}, "response_format", '{"type": "json_object"}'),
    ({"response_format": {}}, "response_format", '{"type": "json_schema", "json_schema"'),
    ({"response_format": {"type": "text", "json_schema": {}}}, "response_format.json_schema",
     "response_format of type text takes only type, not 'json_schema'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": []}}, "response_format.json_schema",
     "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", "name must be 1-64 characters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name", "name must be 1-64 characters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n" * 65, "schema": {}}}},
     "response_format.json_schema.name", "name must be 1-64 characters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}},
     "response_format.json_schema.schema", "schema must be a JSON Schema: an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": '{"type": "object"}'}}},
     "response_format.json_schema.schema", "schema must be a JSON Schema: an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict", "strict must be a boolean"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {}, "schema_": 1}}},
     "response_format.json_schema.schema_", "takes only description, name, schema, strict, not 'schema_'"),
    ({"structured_outputs": "json"}, "structured_outputs", "structured_outputs must be an object"),
    ({"structured_outputs": {"yaml": "x"}}, "structured_outputs.yaml", "it takes one of json, regex, choice"),
    ({"structured_outputs": {"disable_any_whitespace": True}}, "structured_outputs.disable_any_whitespace",
     "is not supported by Fareway"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object", "must be true"),
    ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex", "must be a string"),
    ({"structured_outputs": {"json": 5}}, "structured_outputs.json", "must be a JSON Schema"),
    ({"structured_outputs": {"choice": "yes"}}, "structured_outputs.choice", "must be a list of strings"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice",
     "one structured-output constraint per request; got structured_outputs.regex and structured_outputs.choice"),
    ({"guided_json": 5}, "guided_json", "guided_json must be a JSON Schema"),
    ({"guided_choice": "yes"}, "guided_choice", "guided_choice must be a list of strings"),
    ({"guided_choice": [1]}, "guided_choice", "guided_choice must be a list of strings"),
    ({"guided_grammar": ["root"]}, "guided_grammar", "guided_grammar must be a string"),
    ({"guided_regex": "a", "guided_grammar": 'root ::= "a"'}, "guided_grammar", "got guided_regex and guided_grammar"),
    ({"response_format": SCHEMA, "guided_regex": "a+"}, "guided_regex",
     "got response_format.json_schema.schema and guided_regex"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex",
     "got response_format and structured_outputs.regex"),
])
def test_each_new_parameter_of_the_wrong_type_or_shape_is_refused_by_name(body: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        openai_api.chat_request({**CHAT, **body})
    assert refused.value.field == field
    assert words in refused.value.message


@pytest.mark.parametrize("body, field, words", [
    ({"logprobs": True}, "logprobs", "logprobs must be an integer from 0 to 20"),
    ({"logprobs": 21}, "logprobs", "from 0 to 20"),
    ({"logprobs": -1}, "logprobs", "from 0 to 20"),
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs is not supported"),
    ({"n": 17}, "n", "from 1 to 16"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", "one structured-output constraint"),
])
def test_the_completions_endpoint_refuses_its_own_way(body: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        openai_api.completion_request({"model": "m", "prompt": "x", **body})
    assert (refused.value.field, words in refused.value.message) == (field, True), refused.value.message


def test_refusals_of_the_new_parameters_never_echo_all_of_what_came() -> None:
    for body in ({"structured_outputs": {"k" * 100_000: 1}},
                 {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {}, "x" * 10**5: 1}}},
                 {"response_format": {"type": "x" * 100_000}}, {"guided_choice": ["a"] * 10**5 + [1]}):
        with pytest.raises(InvalidArgument) as refused:
            openai_api.chat_request({**CHAT, **body})
        assert len(refused.value.message) < 300 and len(refused.value.field) < 100


def test_a_schema_nested_past_what_json_can_write_back_is_refused_by_name() -> None:
    schema: dict = {}
    inner = schema
    for _ in range(5000):   # the body's parser stops short of this; a schema built a few calls deeper may not
        inner["items"] = {}
        inner = inner["items"]
    with pytest.raises(InvalidArgument) as refused:
        openai_api.chat_request({**CHAT, "structured_outputs": {"json": schema}})
    assert (refused.value.field, refused.value.message) == ("structured_outputs.json",
                                                            "structured_outputs.json nests objects too deeply")


def _position(token: str, logprob: float, top: list[tuple[str, float]] | None = None, rank: int = 1,
              token_id: int | None = None) -> pb.TokenLogprobs:
    """One position's logprobs; its top defaults to the token alone. Token ids are the first character's."""
    top = [(token, logprob)] if top is None else top
    return pb.TokenLogprobs(token_id=ord(token[0]) if token_id is None else token_id, token=token, logprob=logprob,
                            rank=rank, token_bytes=token.encode(),
                            top=[pb.TopLogprob(token_id=ord(t[0]), token=t, logprob=v, token_bytes=t.encode())
                                 for t, v in top])


TWO_SAMPLES = pb.GenerateResponse(
    request_id="r", model="m", text="Hi", finish_reason=pb.FINISH_REASON_STOP,
    usage=pb.Usage(prompt_tokens=2, completion_tokens=3), logprobs=[_position("Hi", -0.5)],
    prompt_logprobs=[_position("é", -3.0, [("a", -0.1), ("b", -0.2)], rank=7)],
    choices=[pb.Choice(index=1, text="Yo!", finish_reason=pb.FINISH_REASON_LENGTH,
                       logprobs=[_position("Yo", -1.0, [("Ya", -0.25), ("Yo", -1.0)], rank=2),
                                 _position("!", float("-inf"))]),
             pb.Choice(index=0, text="Hi", finish_reason=pb.FINISH_REASON_STOP, logprobs=[_position("Hi", -0.5)])])
ASKED = pb.SamplingParams(n=2, logprobs=2, prompt_logprobs=2)


def test_n_samples_render_as_openais_choices_in_index_order_each_with_its_finish_and_logprobs() -> None:
    chat = openai_api.whole_response("chat", TWO_SAMPLES, 0, ASKED)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in chat["choices"]] == [
        (0, "Hi", "stop"), (1, "Yo!", "length")]
    assert chat["usage"]["completion_tokens"] == 3
    assert chat["choices"][1]["logprobs"] == {"content": [
        {"token": "Yo", "logprob": -1.0, "bytes": [89, 111],
         "top_logprobs": [{"token": "Ya", "logprob": -0.25, "bytes": [89, 97]},
                          {"token": "Yo", "logprob": -1.0, "bytes": [89, 111]}]},
        {"token": "!", "logprob": -9999.0, "bytes": [33],   # -inf, as vLLM's
         "top_logprobs": [{"token": "!", "logprob": -9999.0, "bytes": [33]}]}], "refusal": None}
    assert json.loads(json.dumps(chat, allow_nan=False)) == chat   # JSON, no -Infinity
    # vLLM's prompt_logprobs, on the chat response: None for the first token, then token id -> its figures.
    assert chat["prompt_logprobs"] == [None, {"97": {"logprob": pytest.approx(-0.1), "rank": 1, "decoded_token": "a"},
                                              "98": {"logprob": pytest.approx(-0.2), "rank": 2, "decoded_token": "b"},
                                              "233": {"logprob": -3.0, "rank": 7, "decoded_token": "é"}}]

    text = openai_api.whole_response("text", TWO_SAMPLES, 0, ASKED)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in text["choices"]] == [
        (0, "Hi", "stop"), (1, "Yo!", "length")]
    # The completions API's legacy shape: the chosen token is among top_logprobs, as OpenAI's "logprobs + 1".
    assert text["choices"][1]["logprobs"] == {"tokens": ["Yo", "!"], "token_logprobs": [-1.0, -9999.0],
                                              "top_logprobs": [{"Ya": -0.25, "Yo": -1.0}, {"!": -9999.0}],
                                              "text_offset": [0, 2]}
    assert all(c["prompt_logprobs"] == chat["prompt_logprobs"] for c in text["choices"])   # vLLM's: on the choice
    assert "prompt_logprobs" not in text


def test_one_sample_without_logprobs_renders_as_before() -> None:
    response = pb.GenerateResponse(request_id="r", model="m", text="Hi", finish_reason=pb.FINISH_REASON_LENGTH,
                                   logprobs=[_position("Hi", -0.5)])
    for kind in ("chat", "text"):
        [choice] = openai_api.whole_response(kind, response, 0)["choices"]
        assert (choice["index"], choice["logprobs"], choice["finish_reason"]) == (0, None, "length")
        assert "prompt_logprobs" not in choice
    [choice] = openai_api.whole_response("chat", response, 0, pb.SamplingParams(logprobs=0))["choices"]
    assert [t["token"] for t in choice["logprobs"]["content"]] == ["Hi"]
    assert "prompt_logprobs" not in openai_api.whole_response("chat", response, 0)


def _chunks(raw: bytes) -> list[dict]:
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


def test_a_stream_of_two_samples_carries_each_ones_index_logprobs_and_finish() -> None:
    writer = openai_api.ChunkWriter("chat", "r", "m", 0, include_usage=True, sampling=ASKED)
    raw = (writer.opening()
           + writer.delta(Delta("Yo", (89,), index=1, logprobs=(_position("Yo", -1.0),),
                                prompt_logprobs=tuple(TWO_SAMPLES.prompt_logprobs)))
           + writer.delta(Delta("Hi", (72,), index=0, logprobs=(_position("Hi", -0.5),),
                                finish_reason=pb.FINISH_REASON_STOP))
           + writer.delta(Delta("!", (33,), index=1, logprobs=(_position("!", -2.0),)))
           + writer.delta(Delta("", (), index=1, finish_reason=pb.FINISH_REASON_LENGTH))
           + writer.closing(TWO_SAMPLES))
    chunks = _chunks(raw)
    assert chunks[0]["choices"] == [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in (0, 1)]
    samples = [c["choices"] for c in chunks[1:5]]
    assert all(len(choices) == 1 for choices in samples)
    assert [(c[0]["index"], c[0]["delta"], c[0]["finish_reason"]) for c in samples] == [
        (1, {"content": "Yo"}, None), (0, {"content": "Hi"}, "stop"), (1, {"content": "!"}, None), (1, {}, "length")]
    assert [[t["token"] for t in c[0]["logprobs"]["content"]] for c in samples[:3]] == [["Yo"], ["Hi"], ["!"]]
    assert samples[3][0]["logprobs"] is None
    assert chunks[1]["prompt_logprobs"][0] is None and "233" in chunks[1]["prompt_logprobs"][1]
    assert all("prompt_logprobs" not in c for c in chunks[2:])
    # Each sample finished in its own chunk: the closing adds only the usage (include_usage).
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 3 and len(chunks) == 6


def test_a_streamed_completion_continues_each_samples_text_offsets() -> None:
    writer = openai_api.ChunkWriter("text", "r", "m", 0, include_usage=False, sampling=ASKED)
    raw = (writer.delta(Delta("Hi", (72,), index=0, logprobs=(_position("Hi", -0.5),)))
           + writer.delta(Delta("Yo", (89,), index=1, logprobs=(_position("Yo", -1.0),)))
           + writer.delta(Delta(" you!", (1, 2), index=0, logprobs=(_position(" you", -0.1), _position("!", -0.2)),
                                finish_reason=pb.FINISH_REASON_STOP))
           + writer.closing(TWO_SAMPLES))
    chunks = _chunks(raw)
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks[:3]] == [[0], [0], [2, 6]]
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["Hi", "Yo", " you!"]
    # Sample 1 had no finish of its own: the closing gives it, from the response.
    assert [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks[2:]] == [
        (0, "stop"), (1, "length")]


def test_a_replayed_stream_of_two_samples_sends_both_whole_in_one_chunk() -> None:
    writer = openai_api.ChunkWriter("chat", "r", "m", 0, include_usage=False, sampling=ASKED)
    chunks = _chunks(writer.opening() + writer.closing(TWO_SAMPLES, replayed=True))
    assert len(chunks) == 2
    replayed = chunks[1]["choices"]
    assert [(c["index"], c["delta"], c["finish_reason"]) for c in replayed] == [
        (0, {"content": "Hi"}, "stop"), (1, {"content": "Yo!"}, "length")]
    assert [t["token"] for t in replayed[1]["logprobs"]["content"]] == ["Yo", "!"]
    assert chunks[1]["prompt_logprobs"][0] is None
