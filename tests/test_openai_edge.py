"""The gateway's OpenAI-compatible HTTP edge over real sockets, called by the official `openai` SDK and by
plain HTTP: the same worker (the real SmolLM2), keys, limits, budgets, idempotency, cancellation and usage
records as the gRPC edge."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import grpc
import jsonschema
import openai
import pytest

from fareway.auth import KeyStore
from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.quota import Budget, Budgets, Limits, LimitStore
from fareway.redis import connect
from fareway.worker.v1 import worker_pb2 as wpb
from fareway.worker.v1 import worker_pb2_grpc
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"


@pytest.fixture()
def team() -> str:
    return f"http-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def key(stack, team: str) -> str:  # noqa: ANN001
    return stack.create_key(team, "app")


@pytest.fixture()
def client(stack, key: str) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=stack.http_url, api_key=key, max_retries=0, timeout=120)


def grpc_generate(stack, key: str, request: pb.GenerateRequest) -> pb.GenerateResponse:  # noqa: ANN001
    with grpc.insecure_channel(stack.gateway_address) as channel:
        return inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            request, metadata=(("authorization", f"Bearer {key}"),), timeout=120)


def grpc_chat(max_tokens: int, content: str = QUESTION) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=MODEL, sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens))
    request.chat.messages.add(role="user", content=content)
    return request



def post(stack, path: str, body: Any, key: str | None = None, headers: dict[str, str] | None = None,  # noqa: ANN001
         method: str = "POST") -> tuple[int, dict[str, str], Any]:
    """A plain HTTP request: (status, headers, the JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(stack.http_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {}),
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def worker_load(stack) -> wpb.GetLoadResponse:  # noqa: ANN001
    with grpc.insecure_channel(stack.worker_address) as channel:
        return worker_pb2_grpc.WorkerServiceStub(channel).GetLoad(wpb.GetLoadRequest())


# --- the openai SDK ---------------------------------------------------------------------------------------------


def test_the_sdk_gets_the_workers_greedy_chat_answer_with_usage_and_one_record(stack, client, key, team) -> None:  # noqa: ANN001
    over_grpc = grpc_generate(stack, key, grpc_chat(24))
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=24, temperature=0, metadata={"feature": "faq"}, user="u-17")
    assert reply.object == "chat.completion" and reply.model == MODEL
    [choice] = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == over_grpc.text and "Paris" in over_grpc.text
    assert choice.finish_reason == {pb.FINISH_REASON_LENGTH: "length"}.get(over_grpc.finish_reason, "stop")
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (over_grpc.usage.prompt_tokens,
                                                              over_grpc.usage.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0   # the same prompt, just served over gRPC
    fareway = reply.model_extra["fareway"]
    assert (fareway["worker"], fareway["hardware_class"], fareway["device_count"]) == ("test-worker", "cpu", 1)
    assert fareway["gpu_seconds"] > 0 and fareway["total_ms"] >= fareway["ttft_ms"] > 0
    assert reply.id == f"chatcmpl-{fareway['request_id']}"

    records = {r.request_id: r for r in stack.records(team)}
    assert len(records) == 2
    record = records[fareway["request_id"]]
    assert (record.status, record.team, record.project, record.model) == ("OK", team, "app", MODEL)
    assert record.tags == {"feature": "faq", "user": "u-17"}
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (
        usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, usage.completion_tokens)
    assert record.gpu_seconds == pytest.approx(fareway["gpu_seconds"])


def test_logit_bias_and_penalties_from_the_sdk_reach_the_model(stack, client) -> None:  # noqa: ANN001
    [yes] = stack.worker.tokenizer.encode(" yes")[-1:]
    biased = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=3, temperature=0, logit_bias={str(yes): 100},
                                            presence_penalty=0.5, frequency_penalty=0.5)
    assert biased.choices[0].message.content.split() == ["yes"] * 3
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=1,
                                       presence_penalty=3)


def test_a_streamed_chat_equals_the_whole_one_and_ends_with_its_usage(stack, client, team) -> None:  # noqa: ANN001
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert wait_until(lambda: len(stack.records(team)) == 2)
    assert {r.request_id for r in stack.records(team)} == {
        whole.id.removeprefix("chatcmpl-"), last.id.removeprefix("chatcmpl-")}

    # Without include_usage no chunk carries it.
    plain = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason in ("stop", "length")


def test_the_async_sdk_completes_raw_prompts_streamed_and_not(stack, key) -> None:  # noqa: ANN001
    over_grpc = grpc_generate(stack, key, pb.GenerateRequest(
        model=MODEL, prompt=COUNTING, sampling=pb.SamplingParams(temperature=0.0, max_tokens=12)))

    async def both() -> tuple[Any, list[Any]]:
        async with openai.AsyncOpenAI(base_url=stack.http_url, api_key=key, max_retries=0) as aclient:
            whole = await aclient.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0)
            stream = await aclient.completions.create(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0,
                                                      stream=True)
            return whole, [chunk async for chunk in stream]
    whole, chunks = asyncio.run(both())
    assert whole.object == "text_completion" and whole.choices[0].text == over_grpc.text
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == over_grpc.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_are_listed_and_retrieved(client) -> None:  # noqa: ANN001
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["fareway"]["hardware_classes"] == ["cpu"]
    assert models[0].model_extra["fareway"]["context_length"] > 0
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# --- one request path: keys, limits, budgets, idempotency -------------------------------------------------------


def _store(stack, change) -> None:  # noqa: ANN001
    async def run() -> None:
        client = connect(stack.redis_url)
        try:
            await change(client)
        finally:
            await client.aclose()
    stack.loop.run(run())


def test_a_key_a_rate_limit_and_a_budget_hold_the_same_over_both_edges(stack, client, key, team) -> None:  # noqa: ANN001
    _store(stack, lambda r: LimitStore(r).set(Limits(team, requests_per_minute=2)))
    grpc_generate(stack, key, grpc_chat(1))                     # the first of two
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as over_http:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    with pytest.raises(grpc.RpcError) as over_grpc:
        grpc_generate(stack, key, grpc_chat(1))
    assert over_grpc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert over_http.value.status_code == 429
    def without_wait(message: str) -> str:
        return re.sub(r"retry in [0-9.]+ s", "retry in ... s", message)
    assert without_wait(over_http.value.body["message"]) == without_wait(over_grpc.value.details())
    assert f"team {team} is at its limit of 2 requests per minute" in over_grpc.value.details()
    assert int(over_http.value.response.headers["Retry-After"]) >= 1
    assert len(stack.records(team)) == 2

    # A budget already spent refuses over both, naming it, with OpenAI's code for it.
    other = f"{team}-b"
    other_key = stack.create_key(other, "app")
    grpc_generate(stack, other_key, grpc_chat(1))
    _store(stack, lambda r: Budgets(r).set(Budget(other, hard_usd=1e-9, basis="list")))
    status, _, body = post(stack, "/chat/completions", CHAT, key=other_key)
    with pytest.raises(grpc.RpcError) as budget_grpc:
        grpc_generate(stack, other_key, grpc_chat(1, "hi"))
    assert (status, body["error"]["type"], body["error"]["code"]) == (429, "rate_limit_error", "insufficient_quota")
    assert body["error"]["message"] == budget_grpc.value.details()
    assert f"monthly list budget of team {other}" in body["error"]["message"]

    # A revoked key (never used, so no gateway remembers it) is refused by both with the same words.
    revoked_key = stack.create_key(f"{team}-c", "app")
    [info] = [k for k in stack.loop.run(_list_keys(stack)) if k.team == f"{team}-c"]
    _store(stack, lambda r: KeyStore(r).revoke(info.key_id))
    status, _, body = post(stack, "/models", None, key=revoked_key, method="GET")
    with pytest.raises(grpc.RpcError) as revoked:
        grpc_generate(stack, revoked_key, grpc_chat(1))
    assert revoked.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert (status, body["error"]["type"]) == (401, "authentication_error")
    assert body["error"]["message"] == revoked.value.details()
    assert len(stack.records(other)) == 1


async def _list_keys(stack) -> list[Any]:  # noqa: ANN001
    client = connect(stack.redis_url)
    try:
        return await KeyStore(client).list()
    finally:
        await client.aclose()


def test_an_idempotency_key_replays_the_first_outcome_and_bills_once(stack, client, team) -> None:  # noqa: ANN001
    request_id = f"order-{uuid.uuid4().hex[:8]}"
    ask = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0,
               extra_headers={"Idempotency-Key": request_id})
    first = client.chat.completions.create(**ask)
    again = client.chat.completions.create(**ask)
    assert first.id == again.id == f"chatcmpl-{request_id}"
    assert again.choices[0].message.content == first.choices[0].message.content
    streamed = list(client.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == first.choices[0].message.content
    # The key names that request: another one with it is refused, not answered with the first's answer.
    with pytest.raises(openai.BadRequestError, match="already used for a different request"):
        client.chat.completions.create(**{**ask, "max_tokens": 9})
    [record] = stack.records(team)
    assert record.request_id == request_id


# --- cancellation and deadlines ---------------------------------------------------------------------------------


def test_a_client_leaving_a_stream_stops_the_worker_and_is_billed_for_what_ran(stack, client, team) -> None:  # noqa: ANN001
    stream = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=2000, temperature=0, stream=True)
    received = [next(iter(stream)) for _ in range(3)]
    stream.close()
    assert any(c.choices[0].text for c in received)
    assert wait_until(lambda: worker_load(stack).num_running == 0), "the worker kept generating"
    assert wait_until(lambda: len(stack.records(team)) == 1)
    [record] = stack.records(team)
    assert (record.status, record.finish_reason) == ("CANCELLED", "cancelled")
    assert 1 <= record.completion_tokens < 300 and record.gpu_seconds > 0


def test_a_client_leaving_a_whole_request_stops_the_worker_and_is_billed(stack, client, team) -> None:  # noqa: ANN001
    def ask() -> None:
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=1.0).completions.create(model=MODEL, prompt=COUNTING, max_tokens=2000,
                                                                temperature=0)
    asker = threading.Thread(target=ask)
    asker.start()
    asker.join(30)
    assert wait_until(lambda: worker_load(stack).num_running == 0), "the worker kept generating"
    assert wait_until(lambda: len(stack.records(team)) == 1)
    [record] = stack.records(team)
    assert (record.status, record.finish_reason, record.worker_id) == ("CANCELLED", "cancelled", "test-worker")
    assert 1 <= record.completion_tokens < 2000 and record.gpu_seconds > 0


def test_a_request_timeout_header_is_a_deadline_504_and_a_record(stack, key, team) -> None:  # noqa: ANN001
    status, headers, body = post(stack, "/completions", {"model": MODEL, "prompt": COUNTING, "max_tokens": 2000},
                                 key=key, headers={"X-Request-Timeout": "1.5"})
    assert (status, body["error"]["type"], body["error"]["code"]) == (504, "timeout_error", "deadline_exceeded")
    assert wait_until(lambda: len(stack.records(team)) == 1)
    [record] = stack.records(team)
    assert (record.status, record.finish_reason) == ("DEADLINE_EXCEEDED", "cancelled")
    assert 1 <= record.completion_tokens < 2000

    # Streamed: the chunks so far, then an error event; billed the same way.
    client = openai.OpenAI(base_url=stack.http_url, api_key=key, max_retries=0)
    with client.completions.with_streaming_response.create(
            model=MODEL, prompt=COUNTING, max_tokens=2000, stream=True,
            extra_headers={"X-Request-Timeout": "1.5"}) as response:
        chunks = list(response.iter_lines())
    client.close()
    events = [json.loads(line.removeprefix("data: ")) for line in chunks if line.startswith("data: {")]
    assert any(e.get("choices") and e["choices"][0]["text"] for e in events)
    assert events[-1]["error"]["type"] == "timeout_error"
    assert "X-Request-Timeout" in events[-1]["error"]["message"]
    assert wait_until(lambda: len(stack.records(team)) == 2)
    assert [r.status for r in stack.records(team)] == ["DEADLINE_EXCEEDED"] * 2


# --- errors, as plain HTTP --------------------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/chat/completions", b"{not json", 400, None, "not valid JSON (line 1, column 2)"),
    ("/chat/completions", [1, 2], 400, None, "must be a JSON object"),
    ("/chat/completions", {**CHAT, "n": 17}, 400, "n", "n must be an integer from 1 to 16"),
    ("/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n", "n must be an integer from 1 to 16"),
    ("/chat/completions", {**CHAT, "top_logprobs": 3}, 400, "top_logprobs", "top_logprobs needs logprobs: true"),
    ("/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "from 0 to 20"),
    ("/completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs", "from 0 to 20"),
    ("/chat/completions", {**CHAT, "min_tokens": 5}, 400, "min_tokens", "must not exceed max_tokens"),
    ("/chat/completions", {**CHAT, "stop_token_ids": list(range(65))}, 400, "stop_token_ids", "at most 64"),
    ("/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, 400,
     "response_format.json_schema.name", "name must be 1-64 characters"),
    ("/chat/completions", {**CHAT, "guided_choice": []}, 400, "choice", "choice needs 1-256 strings"),
    ("/chat/completions", {**CHAT, "guided_json": "{not json"}, 400, "json_schema", "json_schema is not JSON"),
    ("/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "no-such-type"}}}}, 400, "json_schema", "does not compile"),
    ("/chat/completions", {**CHAT, "response_format": {"type": "json_object"}, "guided_regex": "a+"}, 400,
     "guided_regex", "one structured-output constraint per request"),
    ("/chat/completions", {**CHAT, "frequency_penalty": 2.5}, 400, "frequency_penalty", "must be in [-2, 2]"),
    ("/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools", "tools is not supported"),
    ("/chat/completions", {**CHAT, "temprature": 0.5}, 400, "temprature", "unknown parameter 'temprature'"),
    ("/chat/completions", {**CHAT, "x" * 5000: 1}, 400, "x" * 40, "(5002 characters)"),
    ("/chat/completions", {**CHAT, "max_tokens": "ten"}, 400, "max_tokens", "must be an integer from 1"),
    ("/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "must be an integer from 1"),
    ("/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature", "temperature must be 0 (greedy) or more"),
    ("/chat/completions", {**CHAT, "stream": "yes"}, 400, "stream", "stream must be a boolean"),
    ("/chat/completions", {**CHAT, "messages": []}, 400, "messages", "non-empty list"),
    ("/chat/completions", {**CHAT, "messages": [{"role": "wizard" * 1000, "content": "hi"}]}, 400,
     "messages[0].role", "(6002 characters)"),
    ("/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]", "must be a text part"),
    ("/chat/completions", {**CHAT, "model": "gpt-9"}, 404, None, "model 'gpt-9' is not served"),
    ("/chat/completions", {**CHAT, "model": "m" * 300}, 400, "model", "longer than 256"),
    ("/completions", {"model": MODEL, "prompt": [1, 2, 3]}, 400, "prompt", "token ids are not taken yet"),
    ("/completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo", "echo is not supported"),
    ("/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop", "stop strings must be 1-256"),
    ("/completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options", "only for stream: true"),
])
def test_bad_requests_get_openais_error_shape_and_leave_no_record(stack, key, team, path, body, status, param,  # noqa: ANN001
                                                                  words) -> None:
    got, _, reply = post(stack, path, body, key=key)
    assert got == status, reply
    error = reply["error"]
    assert words in error["message"] and len(error["message"]) < 400
    assert error["param"] == param
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert stack.records(team) == []


def test_keys_paths_methods_and_sizes_are_refused_in_openais_shape(stack, key) -> None:  # noqa: ANN001
    status, _, body = post(stack, "/chat/completions", CHAT)
    assert (status, body["error"]["type"]) == (401, "authentication_error")
    assert "missing API key" in body["error"]["message"]
    status, _, body = post(stack, "/chat/completions", CHAT, key="fw_nope")
    assert (status, body["error"]["message"]) == (401, "the API key is not valid (unknown or revoked)")
    status, _, body = post(stack, "/chat/completions", CHAT, headers={"Authorization": "Basic abc"})
    assert status == 401 and "must be 'Bearer <API key>'" in body["error"]["message"]
    status, _, body = post(stack, "/embeddings", CHAT, key=key)
    assert status == 404 and "no such endpoint '/v1/embeddings'" in body["error"]["message"]
    status, _, body = post(stack, "/chat/completions", None, key=key, method="GET")
    assert status == 405 and body["error"]["type"] == "invalid_request_error"
    # Refused on its Content-Length, before the body is read (or sent: this client never sends it).
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(stack.http_url).netloc, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in (("Authorization", f"Bearer {key}"), ("Content-Type", "application/json"),
                        ("Content-Length", str(9 << 20))):
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 413 and "larger than 8388608 bytes" in body["error"]["message"]
    status, _, body = post(stack, "/completions", {"model": MODEL, "prompt": "hi"}, key=key,
                           headers={"X-Request-Timeout": "soon"})
    assert (status, body["error"]["param"]) == (400, "X-Request-Timeout")


def _raw_post(stack, body: bytes, headers: dict[str, bytes]) -> tuple[int, Any]:  # noqa: ANN001
    """A POST whose header values are bytes as they are (urllib would encode them)."""
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(stack.http_url).netloc, timeout=60)
    try:
        connection.putrequest("POST", "/v1/chat/completions")
        for name, value in {"Content-Type": b"application/json", "Content-Length": str(len(body)).encode(),
                            **headers}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_bodies_and_headers_that_are_no_text_get_their_status_not_500(stack, key, team) -> None:  # noqa: ANN001
    """Each was a 500 (internal error) before: found by tests/test_fuzz.py."""
    bearer = f"Bearer {key}".encode()
    chat = json.dumps(CHAT).encode()
    for body, headers, status, param, words in [
        (b"[" * 100_000 + b"]" * 100_000, {"Authorization": bearer}, 400, None, "nests arrays or objects too deeply"),
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", {"Authorization": bearer}, 400, None, "longer than 4300 digits"),
        (json.dumps({**CHAT, "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
         {"Authorization": bearer}, 400, "messages[0].content", "lone surrogate"),
        (json.dumps({**CHAT, "temperature": 10**400}).encode(), {"Authorization": bearer}, 400, "temperature",
         "finite number"),
        (chat, {"Authorization": b"Bearer cl\xe9"}, 401, None, "not UTF-8"),
        (chat, {"Authorization": bearer, "Idempotency-Key": b"\xff\xfe"}, 400, "Idempotency-Key", "not UTF-8"),
    ]:
        got, reply = _raw_post(stack, body, headers)
        assert (got, reply["error"]["param"]) == (status, param), reply
        assert words in reply["error"]["message"]
    assert stack.records(team) == []


def test_health_says_serving_without_a_key(stack) -> None:  # noqa: ANN001
    with urllib.request.urlopen(stack.http_url.removesuffix("/v1") + "/health", timeout=10) as response:
        assert (response.status, json.loads(response.read())) == (200, {"status": "serving"})


# --- the generation API: structured outputs, logprobs, n ----------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_response_format_with_a_json_schema_gives_json_that_validates(client) -> None:  # noqa: ANN001
    for temperature in (0.0, 1.0):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=100,
            temperature=temperature, seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
        assert reply.choices[0].finish_reason == "stop"   # the constraint completed, not cut at max_tokens
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'Repeat this JSON exactly: {"city": "Paris"}'}],
        max_tokens=100, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict), reply.choices[0].message.content
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Sentiment of: great!"}],
                                           max_tokens=8, extra_body={"guided_choice": ["positive", "negative"]})
    assert reply.choices[0].message.content in ("positive", "negative")
    year = client.completions.create(model=MODEL, prompt="The Eiffel Tower was finished in the year", max_tokens=8,
                                     temperature=0, extra_body={"structured_outputs": {"regex": " [0-9]{4}"}})
    assert re.fullmatch(" [0-9]{4}", year.choices[0].text), year.choices[0].text


def test_logprobs_come_back_in_openais_shape(client) -> None:  # noqa: ANN001
    ask = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0,
               logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**ask)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token   # greedy: the likeliest
        assert entry.logprob == pytest.approx(values[0], abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = list(client.chat.completions.create(**ask, stream=True))
    tokens = [(t.token, t.logprob) for chunk in streamed for choice in chunk.choices if choice.logprobs
              for t in choice.logprobs.content]
    assert tokens == [(t.token, t.logprob) for t in content]

    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                     logprobs=2)
    legacy = text.choices[0].logprobs
    assert "".join(legacy.tokens) == text.choices[0].text and len(legacy.tokens) == text.usage.completion_tokens
    for top, logprob in zip(legacy.top_logprobs, legacy.token_logprobs, strict=True):
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob, abs=1e-4)   # greedy: the likeliest
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:i]) for i in range(len(legacy.tokens))]
    assert all(v <= 0 for v in legacy.token_logprobs)


def test_prompt_logprobs_come_back_as_vllms(client) -> None:  # noqa: ANN001
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=1, extra_body={"prompt_logprobs": 2})
    prompt = reply.model_extra["prompt_logprobs"]
    assert len(prompt) == reply.usage.prompt_tokens and prompt[0] is None
    for position in prompt[1:]:
        assert 1 <= len(position) <= 3 and all(v["logprob"] <= 0 and v["rank"] >= 1 for v in position.values())
    text = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=1, extra_body={"prompt_logprobs": 0})
    assert len(text.choices[0].model_extra["prompt_logprobs"]) == text.usage.prompt_tokens


def test_n_samples_over_the_sdk_whole_and_streamed(stack, client, team) -> None:  # noqa: ANN001
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 10,
           "temperature": 1.0, "seed": 5, "n": 2, "logprobs": True}
    reply = client.chat.completions.create(**ask)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert all("".join(t.token for t in c.logprobs.content) == c.message.content for c in reply.choices)

    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    usages = []
    for chunk in client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
        if chunk.usage:
            assert chunk.choices == []
            usages.append(chunk.usage)
    assert texts == {c.index: c.message.content for c in reply.choices}   # the same seed, the same samples
    assert finishes == {c.index: [c.finish_reason] for c in reply.choices}   # one finish each
    assert [u.completion_tokens for u in usages] == [reply.usage.completion_tokens]
    assert wait_until(lambda: len(stack.records(team)) == 2)
    assert [r.completion_tokens for r in stack.records(team)] == [reply.usage.completion_tokens] * 2

    text = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=4, temperature=1.0, seed=5, n=2)
    assert [c.index for c in text.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in text.choices)
