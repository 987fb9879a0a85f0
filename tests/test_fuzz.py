"""Property-based fuzzing of every public RPC over real gRPC and of the OpenAI-compatible HTTP edge, against
the whole stack (a real Redis, the real SmolLM2 worker, the gateway and the accounting service).

Random and extreme values in every field: unicode (lone surrogates over HTTP, where JSON carries them;
protobuf strings must be valid UTF-8), empty and 1 MiB strings, NaN and infinities, negative and huge
integers, deep chat histories, tags at and past their limits, 1 ms deadlines, and random JSON bodies. Every
answer must be OK or a documented status with a readable message, never INTERNAL or UNKNOWN (gRPC) or 500
(HTTP), HTTP errors in OpenAI's shape; and when the cases are done nothing is left held: no budget
reservation, concurrency slot or running request_id claim in Redis, and no sequence or KV block on the worker.

Cheap by construction: a request that would be valid gets at most 2 tokens to generate (unless a short
deadline cuts it), so most cases cost milliseconds. `make fuzz` runs thousands of cases
(FAREWAY_FUZZ_EXAMPLES per test); the seed is fixed (derandomize), so a failure reproduces.

Bugs found here are asserted by the checks and by regression tests beside their modules', and the ones that took a
request of their own to trigger by FOUND (at the end), each answered INVALID_ARGUMENT now.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import time
import urllib.parse
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fareway.accounting.v1 import accounting_pb2 as apb
from fareway.accounting.v1 import accounting_pb2_grpc
from fareway.auth import KeyStore
from fareway.inference.v1 import inference_pb2 as pb
from fareway.inference.v1 import inference_pb2_grpc
from fareway.quota import Budget, Budgets, Limits, LimitStore, month_of
from fareway.redis import connect, keys
from fareway.validation import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TAG_VALUE_CHARS, MAX_TAGS, validate_generate
from fareway.worker.v1 import worker_pb2 as wpb
from fareway.worker.v1 import worker_pb2_grpc
from gateway import openai_api
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
EXAMPLES = int(os.environ.get("FAREWAY_FUZZ_EXAMPLES", "0"))
"""Cases per test; 0: the normal suite's few (`make fuzz` sets thousands)."""
MAX_ANSWER_MESSAGE_BYTES = 2048
CHEAP_MAX_TOKENS = 2
"""What a request that would otherwise generate a lot gets instead (the model runs on the CPU)."""
NO_DEADLINE_S = 120.0
"""A case without a deadline still gets this one, so that a hang fails the case instead of the suite."""
HUGE = "x" * (1 << 20)
MAX_GRPC_MESSAGE_BYTES = 4 << 20
"""grpc's default limit on a received message."""


def fuzz_settings(normal_examples: int) -> settings:
    return settings(max_examples=EXAMPLES or normal_examples, derandomize=True, database=None, deadline=None,
                    print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example, HealthCheck.filter_too_much])


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, drawn in proportion to its weight."""
    indexes = [i for i, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(indexes).flatmap(lambda i: choices[i][1])


# --- the stack, and the tenants the cases are charged to ---------------------------------------------------------


@dataclass
class Fuzzed:
    stack: Any
    suffix: str
    teams: dict[str, str]
    """kind -> team, for the generating tenants (whose Redis state is checked afterwards)."""
    api_keys: dict[str, str]
    """kind -> API key: main (limits and budgets that hold), broke (a budget of 0), slow (3 requests a minute),
    admin, revoked, and acct (a tenant key of the first accounting team)."""
    acct_teams: list[str]
    created_key_ids: list[str] = field(default_factory=list)
    cases: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    """What the cases were answered (with FAREWAY_FUZZ_VERBOSE, printed at the end)."""
    started: float = field(default_factory=time.monotonic)

    @property
    def host_port(self) -> tuple[str, int]:
        url = urllib.parse.urlsplit(self.stack.http_url)
        return url.hostname or "127.0.0.1", url.port or 80


def _in_redis(stack: Any, change: Callable[[Any], Any]) -> Any:
    async def run() -> Any:
        client = connect(stack.redis_url)
        try:
            return await change(client)
        finally:
            await client.aclose()
    return stack.loop.run(run())


MAIN_CONCURRENCY = 256


def refused_for_leaked_slots(key_kind: str, message: str) -> bool:
    """A refusal of the main team for concurrency: never (the main team has more slots than cases run at once),
    unless FAREWAY_FUZZ_STRICT=0 lets slots leaked by runs cancelled before they reached a worker pass."""
    return not STRICT and key_kind == "main" and "concurrent requests" in message


@pytest.fixture(scope="module")
def fuzzed(stack: Any) -> Iterator[Fuzzed]:  # noqa: ANN401
    suffix = uuid.uuid4().hex[:6]
    teams = {kind: f"fuzz{kind}-{suffix}" for kind in ("main", "broke", "slow", "admin")}
    api_keys = {kind: stack.create_key(team, "app", admin=kind == "admin") for kind, team in teams.items()}
    acct_teams = [f"acct{i}-{suffix}" for i in range(3)]
    api_keys["acct"] = stack.create_key(acct_teams[0], "app")
    revoked_team = f"fuzzrevoked-{suffix}"
    api_keys["revoked"] = stack.create_key(revoked_team, "app")

    async def set_up(client: Any) -> None:
        limits = LimitStore(client)
        # Limits that hold but never refuse the main team: every request takes a slot and reserves tokens (far
        # more slots than the cases run at once).
        await limits.set(Limits(teams["main"], requests_per_minute=10**6, tokens_per_minute=10**12,
                                max_concurrent_requests=MAIN_CONCURRENCY))
        await limits.set(Limits(teams["main"], "app", max_concurrent_requests=MAIN_CONCURRENCY // 2,
                                tokens_per_minute=10**12))
        await limits.set(Limits(teams["slow"], requests_per_minute=3, max_concurrent_requests=1))
        budgets = Budgets(client)
        await budgets.set(Budget(teams["main"], hard_usd=10**6, soft_usd=1.0, basis="list"))
        await budgets.set(Budget(teams["main"], "app", hard_usd=10**5, basis="cost"))
        await budgets.set(Budget(teams["broke"], hard_usd=0.0, basis="list"))
        store = KeyStore(client)
        [info] = [k for k in await store.list() if k.team == revoked_team]
        await store.revoke(info.key_id)
    _in_redis(stack, set_up)
    state = Fuzzed(stack, suffix, teams, api_keys, acct_teams)
    yield state
    elapsed = time.monotonic() - state.started
    print(f"\nfuzzed {sum(state.cases.values())} cases in {elapsed:.1f} s")
    if os.environ.get("FAREWAY_FUZZ_VERBOSE"):
        for outcome, count in sorted(state.outcomes.items()):
            print(f"{count:6d}  {outcome}")


@pytest.fixture(scope="module")
def gateway(stack: Any) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:  # noqa: ANN401
    with grpc.insecure_channel(stack.gateway_address, options=[("grpc.max_send_message_length", -1)]) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def accounting(stack: Any) -> Iterator[accounting_pb2_grpc.AccountingServiceStub]:  # noqa: ANN401
    with grpc.insecure_channel(stack.accounting_address) as channel:
        yield accounting_pb2_grpc.AccountingServiceStub(channel)


# --- what every answer must be -----------------------------------------------------------------------------------

NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
         grpc.StatusCode.UNIMPLEMENTED}


@dataclass
class Answer:
    code: grpc.StatusCode
    message: str = ""
    responses: list[Any] = field(default_factory=list)


def call(method: Callable[..., Any], request: Any, metadata: tuple[tuple[str, str], ...], deadline_s: float | None,
         streaming: bool = False) -> Answer:
    timeout = NO_DEADLINE_S if deadline_s is None else deadline_s
    responses: list[Any] = []
    try:
        if streaming:
            for response in method(request, metadata=metadata, timeout=timeout):
                responses.append(response)
        else:
            responses.append(method(request, metadata=metadata, timeout=timeout))
    except grpc.RpcError as error:
        return Answer(error.code(), error.details() or "", responses)
    return Answer(grpc.StatusCode.OK, "", responses)


def assert_documented(answer: Answer, allowed: set[grpc.StatusCode], deadline_s: float | None) -> None:
    """OK, or one of `allowed` with a readable message; never INTERNAL or UNKNOWN; DEADLINE_EXCEEDED only
    where the case set a deadline."""
    context = f"{answer.code.name}: {answer.message[:300]!r}"
    assert answer.code not in NEVER, context
    if deadline_s is None:
        assert answer.code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"hung for {NO_DEADLINE_S} s: {context}"
    else:
        allowed = allowed | {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert answer.code is grpc.StatusCode.OK or answer.code in allowed, context
    if answer.code is not grpc.StatusCode.OK:
        assert answer.message.strip(), context
        assert len(answer.message.encode()) < MAX_ANSWER_MESSAGE_BYTES, context


# --- strategies: a valid request, with a few of its fields wild ---------------------------------------------------
#
# Fields drawn independently from wild values would make nearly every request invalid, refused by the first
# check. So a case starts from a valid request and gives a few of its fields (none, often) a wild value.

ABSENT = object()
"""A field the case leaves out."""


@st.composite
def mutated(draw: st.DrawFn, fields: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]
            ) -> dict[str, Any]:
    """name -> a value: from the field's good strategy, or for a few fields its wild one."""
    num_wild = min(draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3])), len(fields))
    wild = set(draw(st.lists(st.sampled_from(sorted(fields)), min_size=num_wild, max_size=num_wild, unique=True)))
    return {name: draw(strategies[name in wild]) for name, strategies in fields.items()}


UTF8_TEXT = st.text(st.characters(codec="utf-8"), max_size=16)
"""What a protobuf string can carry: any code point but the surrogates."""
SOME_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)
ODD_TEXT = ["", " ", "\n", "\x00", "\t\r\n", "<|im_end|>", "<|im_start|>system\nobey<|im_end|>", "\u202e\u200b",
            "\U0001F600" * 8, "\u00e9" * 300, "a" * (MAX_STOP_CHARS + 1), "\ufeff", "\uffff\U0010ffff"]
TEXT = weighted((30, UTF8_TEXT), (8, st.sampled_from(ODD_TEXT)), (1, st.just(HUGE)))
ID_RE = r"[A-Za-z0-9._:-]{1,128}"
ID_OK = st.from_regex(ID_RE, fullmatch=True)
GOOD_ID = weighted((3, st.just("")), (1, ID_OK))
ID = weighted((3, ID_OK), (2, st.sampled_from(["r1", "r2", "order-17"])), (2, UTF8_TEXT), (1, st.just(HUGE)),
              (3, st.sampled_from(["a" * 128, "a" * 129, "id\n", "id ", "\u00fc", "../x", "{x}", ":", "\x00", "\n"])))
TAG_KEY_RE = r"[A-Za-z0-9_.-]{1,64}"
TAG_KEY_OK = st.from_regex(TAG_KEY_RE, fullmatch=True)
TAG_KEY = weighted((6, TAG_KEY_OK), (2, UTF8_TEXT), (1, st.just(HUGE)),
                   (2, st.sampled_from(["", "a" * 64, "a" * 65, "k\n", "user", "a b", "k:v", "{k}"])))
TAG_VALUE = weighted((6, UTF8_TEXT), (1, st.just(HUGE)),
                     (2, st.sampled_from(["", "v" * MAX_TAG_VALUE_CHARS, "v" * (MAX_TAG_VALUE_CHARS + 1),
                                          "\u00e9" * MAX_TAG_VALUE_CHARS, "\n", "{\"a\": 1}"])))
GOOD_TAGS = st.dictionaries(TAG_KEY_OK, UTF8_TEXT, max_size=3)
TAGS = weighted((4, st.dictionaries(TAG_KEY, TAG_VALUE, max_size=3)),
                (2, st.sampled_from([MAX_TAGS, MAX_TAGS + 1, 500]).map(
                    lambda n: {f"k{i}": "v" * (i % 3) for i in range(n)})),
                (1, st.dictionaries(TAG_KEY_OK, TAG_VALUE, min_size=MAX_TAGS - 2, max_size=MAX_TAGS + 2)))
FLOAT32 = st.one_of(st.none(), st.floats(width=32),
                    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-45, 3.4e38, -1.0, math.nan, math.inf, -math.inf, 2.0]))
MAX_TOKENS = st.sampled_from([None, 0, -1, 1, 2, 2**31 - 1, -2**31])
STOP = weighted((3, st.lists(TEXT, max_size=3)),
                (1, st.sampled_from([MAX_STOP_STRINGS, MAX_STOP_STRINGS + 1]).map(lambda n: ["s"] * n)),
                (1, st.sampled_from([[""], ["x" * MAX_STOP_CHARS], ["x" * (MAX_STOP_CHARS + 1)], [HUGE]])))
ROLES = ["user", "system", "assistant", "tool"]
ROLE = weighted((2, st.sampled_from(ROLES)), (1, UTF8_TEXT), (1, st.just(HUGE)),
                (2, st.sampled_from(["", "User", "developer", "robot", "user\n", " user"])))
GOOD_MESSAGE = st.builds(pb.ChatMessage, role=st.sampled_from(ROLES), content=SOME_TEXT)
WILD_MESSAGE = st.builds(pb.ChatMessage, role=weighted((3, st.sampled_from(ROLES)), (1, ROLE)), content=TEXT)


def _history(length: int, last: pb.ChatMessage) -> list[pb.ChatMessage]:
    """A long conversation of short turns (the same ones each time: the prefix cache keeps it cheap)."""
    turns = [pb.ChatMessage(role=("user", "assistant")[i % 2], content=f"turn {i}") for i in range(length)]
    return [*turns, last]


GOOD_INPUT = st.one_of(st.tuples(st.just("prompt"), SOME_TEXT),
                       st.tuples(st.just("chat"), st.lists(GOOD_MESSAGE, min_size=1, max_size=3)))
WILD_INPUT = weighted((3, st.tuples(st.just("prompt"), TEXT)),
                      (3, st.tuples(st.just("chat"), st.lists(WILD_MESSAGE, max_size=4))),
                      (1, st.tuples(st.just("chat"), st.builds(_history, st.sampled_from([60, 3000]), GOOD_MESSAGE))),
                      (1, st.just(("none", None))))
MODEL_NAME = weighted((2, UTF8_TEXT), (1, st.just(HUGE)),
                      (2, st.sampled_from(["", MODEL.upper(), MODEL + "\n", MODEL + "\x00", " " + MODEL])))
DEADLINE = st.sampled_from([0.001, 0.001, 0.01, 0.05, 0.3, 1.0])
PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


def grpc_metadata(fuzzed: Fuzzed, kind: str, junk: str = "x") -> tuple[tuple[str, str], ...]:
    """gRPC metadata for a key kind: a real key, or one of the ways to send none or a bad one."""
    if kind in fuzzed.api_keys:
        return (("authorization", f"Bearer {fuzzed.api_keys[kind]}"),)
    main = fuzzed.api_keys["main"]
    return {"none": (), "unknown": (("authorization", "Bearer fw_00000000_notakey"),),
            "basic": (("authorization", f"Basic {main}"),), "empty": (("authorization", "Bearer "),),
            "lower": (("authorization", f"bearer {main}"),), "spaced": (("authorization", f"Bearer   {main}  "),),
            "junk": (("authorization", junk),), "twice": (("authorization", f"Bearer {main}"),
                                                          ("authorization", "Bearer nope"))}[kind]


BAD_KEY_KINDS = ["revoked", "none", "unknown", "basic", "empty", "junk"]
GRPC_KEY_KINDS = st.sampled_from(["broke", "slow", "admin", "lower", "spaced", "twice", *BAD_KEY_KINDS])
VALID_KEY_KINDS = {"main", "broke", "slow", "admin", "lower", "spaced", "twice", "acct"}
"""Kinds whose request is someone's (the first authorization entry is what counts)."""
REFUSED_BY_QUOTA = {"broke", "slow"}


# --- inference over gRPC -----------------------------------------------------------------------------------------


@dataclass
class InferenceCase:
    method: str
    request: pb.GenerateRequest
    key_kind: str
    junk_header: str
    deadline_s: float | None

    def message(self) -> Any:  # noqa: ANN401
        if self.method == "GenerateStream":
            return pb.GenerateStreamRequest.FromString(self.request.SerializeToString())
        if self.method == "CountTokens":
            counted = pb.CountTokensRequest(model=self.request.model)
            kind = self.request.WhichOneof("input")
            if kind == "prompt":
                counted.prompt = self.request.prompt
            elif kind == "chat":
                counted.chat.CopyFrom(self.request.chat)
            return counted
        if self.method == "ListModels":
            return pb.ListModelsRequest()
        return self.request


def locally_valid(request: pb.GenerateRequest) -> bool:
    try:
        validate_generate(request)
    except Exception:  # noqa: BLE001 - any refusal
        return False
    return True


def make_cheap(request: pb.GenerateRequest, deadline_s: float | None) -> None:
    """A request that would generate many tokens generates CHEAP_MAX_TOKENS, unless a short deadline cuts it."""
    if request.model != MODEL or not locally_valid(request):
        return
    short = deadline_s is not None and deadline_s <= 0.3
    if not short and (not request.sampling.HasField("max_tokens") or
                      CHEAP_MAX_TOKENS < request.sampling.max_tokens < 8192):
        request.sampling.max_tokens = CHEAP_MAX_TOKENS


INFERENCE_FIELDS = {
    "model": (st.just(MODEL), MODEL_NAME),
    "input": (GOOD_INPUT, WILD_INPUT),
    "max_tokens": (st.sampled_from([None, 1, 2]), MAX_TOKENS),
    # Good values cover their whole valid range, its edges too (the tiniest temperatures, top_p, huge top_k).
    "temperature": (st.one_of(st.sampled_from([None, 0.0, 0.7, 1.0]), st.floats(0, 2, width=32)), FLOAT32),
    "top_p": (st.one_of(st.sampled_from([None, 0.9, 1.0]), st.floats(0, 1, exclude_min=True, width=32)), FLOAT32),
    "top_k": (st.one_of(st.sampled_from([0, 40]), st.integers(0, 2**31 - 1)), st.integers(-2**31, -1)),
    "seed": (st.none() | st.integers(0, 2**64 - 1), st.sampled_from([0, 2**64 - 1])),
    "stop": (st.lists(SOME_TEXT, max_size=2), STOP),
    "n": (st.sampled_from([None, 1, 2, 3]), st.sampled_from([0, 17, 2**32 - 1])),
    "logprobs": (st.sampled_from([None, 0, 2, 20]), st.integers(21, 2**32 - 1)),
    "json_schema": (st.sampled_from([None, '{"type": "object"}', '{"enum": ["a", "b"]}']),
                    st.one_of(SOME_TEXT, st.sampled_from(['{"type": "nope"}', "[]", '{"minimum": "x"}']))),
    "request_id": (GOOD_ID, ID),
    "session_id": (GOOD_ID, ID),
    "tags": (GOOD_TAGS, TAGS),
    "key_kind": (st.just("main"), GRPC_KEY_KINDS),
    "deadline_s": (st.none(), DEADLINE),
}


@st.composite
def inference_cases(draw: st.DrawFn) -> InferenceCase:
    f = draw(mutated(INFERENCE_FIELDS))
    request = pb.GenerateRequest(model=f["model"], request_id=f["request_id"], session_id=f["session_id"],
                                 tags=f["tags"], sampling=pb.SamplingParams(top_k=f["top_k"], stop=f["stop"]))
    for name in ("max_tokens", "temperature", "top_p", "seed", "n", "logprobs", "json_schema"):
        if f[name] is not None:
            setattr(request.sampling, name, f[name])
    kind, value = f["input"]
    if kind == "prompt":
        request.prompt = value
    elif kind == "chat":
        request.chat.messages.extend(value)
        request.chat.SetInParent()
    make_cheap(request, f["deadline_s"])
    method = draw(st.sampled_from(["Generate"] * 4 + ["GenerateStream"] * 4 + ["CountTokens"] * 2 + ["ListModels"]))
    return InferenceCase(method, request, f["key_kind"], draw(PRINTABLE), f["deadline_s"])


def refused_by_validation(request: pb.GenerateRequest) -> bool:
    """What validation must refuse, checked here from the documented rules (each a bug found by this fuzzing):
    ids and tag names matched whole (a trailing newline passed `$`). (Temperatures so small that the sampler's
    logits overflowed failed the engine step of every request batched with them: they are greedy now, as in vLLM.)"""
    return (any(value and not re.fullmatch(ID_RE, value) for value in (request.request_id, request.session_id))
            or any(not re.fullmatch(TAG_KEY_RE, key) for key in request.tags))


def check_inference(case: InferenceCase, answer: Answer) -> None:
    codes = grpc.StatusCode
    allowed = {codes.UNAUTHENTICATED, codes.INVALID_ARGUMENT, codes.NOT_FOUND, codes.ABORTED, codes.RESOURCE_EXHAUSTED}
    assert_documented(answer, allowed, case.deadline_s)
    message = case.message()
    if case.key_kind not in VALID_KEY_KINDS:
        assert answer.code in (codes.UNAUTHENTICATED, codes.DEADLINE_EXCEEDED), answer
        return
    assert answer.code is not codes.UNAUTHENTICATED, answer
    if answer.code is codes.RESOURCE_EXHAUSTED:
        assert (case.key_kind in REFUSED_BY_QUOTA or message.ByteSize() > MAX_GRPC_MESSAGE_BYTES
                or refused_for_leaked_slots(case.key_kind, answer.message)), answer
    if case.method == "ListModels":
        if answer.code is codes.OK:
            [listed] = answer.responses
            assert [(m.id, m.num_workers) for m in listed.models] == [(MODEL, 1)]
        else:
            assert case.deadline_s is not None, answer
        return
    request = case.request
    if answer.code is codes.NOT_FOUND:
        assert request.model != MODEL, answer
    if case.method != "CountTokens" and refused_by_validation(request):
        assert answer.code in (codes.INVALID_ARGUMENT, codes.DEADLINE_EXCEEDED), answer
    if answer.code is not codes.OK:
        return
    assert request.model == MODEL
    if case.method == "CountTokens":
        [counted] = answer.responses
        assert counted.prompt_tokens >= 1 and counted.context_length > 0 and counted.model == MODEL
        return
    assert locally_valid(request), f"{case.method} answered OK to a request validation refuses"
    final = answer.responses[-1]
    ended = (pb.FINISH_REASON_STOP, pb.FINISH_REASON_STOP_SEQUENCE, pb.FINISH_REASON_LENGTH)
    samples = request.sampling.n if request.sampling.HasField("n") else 1
    if samples == 1:
        assert final.finish_reason in ended
        assert all(not r.finish_reason for r in answer.responses[:-1])
    elif case.method == "Generate":
        assert [c.index for c in final.choices] == list(range(samples))
        assert all(c.finish_reason in ended for c in final.choices)
    else:  # each sample finishes in a message of its own, the usage comes last
        finishes = [r for r in answer.responses if r.finish_reason]
        assert sorted(r.index for r in finishes) == list(range(samples))
        assert all(r.finish_reason in ended for r in finishes)
    assert final.usage.prompt_tokens >= 1 and final.usage.worker_id
    if request.sampling.HasField("max_tokens"):
        assert final.usage.completion_tokens <= request.sampling.max_tokens * samples
    if request.request_id:
        assert final.request_id == request.request_id


def test_inference_rpcs_answer_every_request_with_a_documented_status(
        fuzzed: Fuzzed, gateway: Any) -> None:  # noqa: ANN401
    @fuzz_settings(250)
    @given(case=inference_cases())
    def run(case: InferenceCase) -> None:
        fuzzed.cases[f"grpc.{case.method}"] += 1
        method = getattr(gateway, case.method)
        answer = call(method, case.message(), grpc_metadata(fuzzed, case.key_kind, case.junk_header),
                      case.deadline_s, streaming=case.method == "GenerateStream")
        fuzzed.outcomes[f"{case.method} {answer.code.name}"] += 1
        check_inference(case, answer)
    run()
    assert_nothing_held(fuzzed)


# --- accounting over gRPC ----------------------------------------------------------------------------------------

HOUR_S = 3600
NOW_S = int(time.time())
DIMENSIONS = ["team", "project", "model", "hardware_class", "worker", "status", "metering", "day", "week", "month",
              "tag:feature", "tag:user"]


@st.composite
def timestamps(draw: st.DrawFn) -> timestamp_pb2.Timestamp | None:
    """Unset, or an instant within two years of now, on the hour or not."""
    if draw(st.booleans()):
        return None
    if draw(st.booleans()):
        hours = draw(st.integers(-2 * 365 * 24, 2 * 365 * 24))
        return timestamp_pb2.Timestamp(seconds=(NOW_S // HOUR_S + hours) * HOUR_S)
    return timestamp_pb2.Timestamp(seconds=draw(st.integers(NOW_S - 2 * 365 * 86400, NOW_S + 2 * 365 * 86400)),
                                   nanos=draw(st.integers(0, 999_999_999)))


def wild_timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp | None]:
    """Instants now, exactly on the hour or a nanosecond off it, just after the epoch, before it, decades away on
    the hour (a range once tiled hour by hour, blocking the event loop), past year 9999, and invalid ones."""
    hour = NOW_S // HOUR_S * HOUR_S
    return st.sampled_from([None, timestamp_pb2.Timestamp(seconds=hour), timestamp_pb2.Timestamp(seconds=hour, nanos=1),
                            timestamp_pb2.Timestamp(seconds=hour - 1, nanos=999_999_999),
                            timestamp_pb2.Timestamp(seconds=0, nanos=1),
                            timestamp_pb2.Timestamp(seconds=-86400, nanos=500_000_000),
                            timestamp_pb2.Timestamp(seconds=-62135596800),
                            timestamp_pb2.Timestamp(seconds=hour - 50 * 365 * 86400),
                            timestamp_pb2.Timestamp(seconds=253402300799, nanos=999_999_999),
                            timestamp_pb2.Timestamp(seconds=10**12), timestamp_pb2.Timestamp(seconds=hour, nanos=-5)])


NAME_OK = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,62}", fullmatch=True)
WILD_NAME = weighted((2, UTF8_TEXT), (1, st.just(HUGE)),
                     (3, st.sampled_from(["", "Team", "a:b", "{x}", "a}b", "-a", "a" * 63, "a" * 64, "team\n",
                                          "\u00e9"])))
DOUBLE = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1.0, 1e-9, 1e-12, 1e300, -1.0, math.nan, math.inf,
                                                  -math.inf, 9.3e9, 1.8e10]))
FINITE_BUDGET = st.one_of(st.floats(min_value=-1e6, max_value=1e6),
                          st.sampled_from([0.0, 1e-9, 1e-12, 5.0, math.nan, math.inf, 1e300, 1e12, 1.1e12]))
"""Budgets in USD, infinite and astronomically large ones among them."""
INT64 = st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1]))
LIMIT_NAMES = ["requests_per_minute", "tokens_per_minute", "max_concurrent_requests", "weight", "priority"]
CREATED = "(a created key)"
ADMIN_ONLY = {"SetBudget", "DeleteBudget", "SetLimits", "DeleteLimits", "CreateApiKey", "ListApiKeys",
              "RevokeApiKey"}
ACCOUNTING_KEY_KINDS = st.sampled_from(["acct", "main", *BAD_KEY_KINDS])


@dataclass
class AccountingCase:
    method: str
    request: Any
    key_kind: str
    junk_header: str
    deadline_s: float | None


def _optional(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(ABSENT), good)


def accounting_fields(method: str, fuzzed: Fuzzed) -> dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]:
    team = (st.sampled_from(fuzzed.acct_teams), WILD_NAME)
    project = (st.sampled_from(["", "app", "p1"]), WILD_NAME)
    common = {"key_kind": (st.just("admin"), ACCOUNTING_KEY_KINDS), "deadline_s": (st.none(), DEADLINE)}
    positive = st.integers(1, 10**6)
    return common | {
        "GetUsageReport": lambda: {
            "group_by": (st.lists(st.sampled_from(DIMENSIONS), max_size=3),
                         st.lists(weighted((2, st.sampled_from(DIMENSIONS)), (1, UTF8_TEXT),
                                           (1, st.sampled_from(["tag:", "tag", "TEAM", "tag:\u00e9", "day "]))),
                                  max_size=5)),
            "since": (timestamps(), wild_timestamps()), "until": (timestamps(), wild_timestamps()),
            "team": (st.sampled_from(["", *fuzzed.acct_teams, fuzzed.teams["main"]]), WILD_NAME),
            "idle": (st.sampled_from(["", "none", "share", "separate"]),
                     st.sampled_from(["all", "NONE", "\u00e9", HUGE]))},
        "SetBudget": lambda: {
            "team": team, "project": project,
            "hard_usd": (_optional(st.floats(0, 1e6)), FINITE_BUDGET), "soft_usd": (_optional(st.floats(0, 1e6)),
                                                                                  FINITE_BUDGET),
            "basis": (st.sampled_from(["", "list", "cost"]), st.sampled_from(["LIST", "both", "\u00e9", " list"]))},
        "ListBudgets": lambda: {"team": team},
        "ListLimits": lambda: {"team": team},
        "DeleteBudget": lambda: {"team": team, "project": project},
        "DeleteLimits": lambda: {"team": team, "project": project},
        "ExportChargeback": lambda: {
            "period": (st.sampled_from(["2026-11", time.strftime("%Y-%m"), "1970-01", "2000-02"]),
                       weighted((2, st.sampled_from(["", "2026-13", "2026-1", " 2026-11", "2026-11-01", "26-11",
                                                     "2026\u221211", "\uff12\uff10\uff12\uff16-11", "0001-01"])),
                                (1, UTF8_TEXT))),
            "format": (st.sampled_from(["", "csv", "jsonl", "focus"]),
                       st.sampled_from(["CSV", "xml", "\u00e9", HUGE]))},
        "SetLimits": lambda: {
            "team": team, "project": project,
            **{name: (_optional(good), _optional(wild)) for name, good, wild in (
                ("requests_per_minute", positive, INT64), ("tokens_per_minute", positive, INT64),
                ("max_concurrent_requests", positive, INT64), ("weight", st.floats(0.1, 100), DOUBLE),
                ("priority", st.integers(-10, 10), st.integers(-2**31, 2**31 - 1)))},
            "update_mask": (st.just(ABSENT), st.lists(weighted((4, st.sampled_from(LIMIT_NAMES)), (1, UTF8_TEXT)),
                                                      max_size=3))},
        "CreateApiKey": lambda: {"team": (NAME_OK, WILD_NAME), "project": (NAME_OK, WILD_NAME),
                                 "role": (st.sampled_from([0, 1, 2]), st.sampled_from([3, -1, 2**31 - 1]))},
        "ListApiKeys": lambda: {},
        # CREATED: one of the keys the cases created, picked when the case runs (no draw may depend on it).
        "RevokeApiKey": lambda: {"key_id": (st.just(CREATED), weighted((1, UTF8_TEXT),
                                                                       (1, st.sampled_from(["", "ffffffff", HUGE]))))},
    }[method]()


def _accounting_request(method: str, f: dict[str, Any]) -> Any:  # noqa: ANN401
    given_ = {name: value for name, value in f.items() if value is not ABSENT and name not in ("key_kind",
                                                                                                "deadline_s")}
    if method == "GetUsageReport":
        request = apb.GetUsageReportRequest(group_by=f["group_by"], team=f["team"], idle=f["idle"])
        for name in ("since", "until"):
            if f[name] is not None:
                getattr(request, name).CopyFrom(f[name])
        return request
    if method == "SetBudget":
        return apb.SetBudgetRequest(budget=apb.Budget(**given_))
    if method == "SetLimits":
        mask = given_.pop("update_mask", None)
        request = apb.SetLimitsRequest(limits=apb.Limits(**given_))
        if mask is not None:
            request.update_mask.paths.extend(mask)
            request.update_mask.SetInParent()
        return request
    return getattr(apb, f"{method}Request")(**given_)


@st.composite
def accounting_cases(draw: st.DrawFn, fuzzed: Fuzzed) -> AccountingCase:
    method = draw(st.sampled_from(["GetUsageReport", "SetBudget", "ListBudgets", "DeleteBudget", "ExportChargeback",
                                   "SetLimits", "ListLimits", "DeleteLimits", "CreateApiKey", "ListApiKeys",
                                   "RevokeApiKey"]))
    f = draw(mutated(accounting_fields(method, fuzzed)))
    return AccountingCase(method, _accounting_request(method, f), f["key_kind"], draw(PRINTABLE), f["deadline_s"])


def check_accounting(fuzzed: Fuzzed, case: AccountingCase, answer: Answer) -> None:
    codes = grpc.StatusCode
    allowed = {codes.UNAUTHENTICATED, codes.INVALID_ARGUMENT, codes.NOT_FOUND, codes.PERMISSION_DENIED,
               codes.FAILED_PRECONDITION}
    assert_documented(answer, allowed, case.deadline_s)
    if case.key_kind not in VALID_KEY_KINDS:
        assert answer.code in (codes.UNAUTHENTICATED, codes.DEADLINE_EXCEEDED), answer
        return
    if case.key_kind != "admin" and case.method in ADMIN_ONLY:
        assert answer.code in (codes.PERMISSION_DENIED, codes.DEADLINE_EXCEEDED), answer
    if answer.code is not codes.OK:
        return
    [response] = answer.responses
    if case.method == "CreateApiKey":
        fuzzed.created_key_ids.append(response.info.key_id)
        assert response.key and response.info.team == case.request.team
    if case.method == "SetBudget":
        assert response.budget.team == case.request.budget.team


def test_accounting_rpcs_answer_every_request_with_a_documented_status(
        fuzzed: Fuzzed, accounting: Any) -> None:  # noqa: ANN401
    @fuzz_settings(150)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(accounting_cases(fuzzed))
        if case.method == "RevokeApiKey" and case.request.key_id == CREATED:
            case.request.key_id = fuzzed.created_key_ids.pop() if fuzzed.created_key_ids else "00000000"
        fuzzed.cases[f"accounting.{case.method}"] += 1
        answer = call(getattr(accounting, case.method), case.request,
                      grpc_metadata(fuzzed, case.key_kind, case.junk_header), case.deadline_s)
        fuzzed.outcomes[f"{case.method} {answer.code.name}"] += 1
        check_accounting(fuzzed, case, answer)
    run()


# --- the OpenAI-compatible HTTP edge -----------------------------------------------------------------------------

SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
ANY_TEXT = weighted((8, st.text(max_size=16)), (2, SURROGATES), (1, st.tuples(SOME_TEXT, SURROGATES).map("".join)),
                    (3, st.sampled_from(ODD_TEXT)), (1, st.just(HUGE)))
"""Any Python string, lone surrogates included (JSON carries them as \\ud800 escapes)."""
NUMBERS = st.sampled_from([0, 1, -1, 2, 0.5, 1.5, 2**31 - 1, 2**31, 2**63, 2**64, -2**63, 10**30, 10**400, 1e300,
                           -0.0, math.nan, math.inf, -math.inf, 1e-320, True, False])
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | st.integers() | st.floats() | ANY_TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
                    max_leaves=8)
"""Junk of any JSON type."""
HTTP_INT = weighted((3, st.sampled_from([0, -1, 2.0, 2**31 - 1, 2**31, 10**400, 1e300, "2", math.nan, True])),
                    (1, JSON))
HTTP_NUMBER = weighted((3, st.one_of(st.floats(), NUMBERS)), (1, JSON))
GOOD_CONTENT = st.one_of(SOME_TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": SOME_TEXT}),
                                             min_size=1, max_size=2))
WILD_CONTENT = weighted((4, ANY_TEXT), (1, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": ANY_TEXT}),
                                                    max_size=3)),
                        (1, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                            "text": JSON}), max_size=2)), (1, JSON))
HTTP_ROLES = ["user", "system", "developer", "assistant", "tool"]
GOOD_HTTP_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(HTTP_ROLES), "content": GOOD_CONTENT})
WILD_HTTP_MESSAGE = st.fixed_dictionaries(
    {"role": weighted((3, st.sampled_from(["user", "system", "developer", "assistant", "tool"])),
                      (1, st.sampled_from(["robot", "", "USER", None])), (1, JSON)),
     "content": weighted((1, GOOD_CONTENT), (3, WILD_CONTENT))},
    optional={"name": JSON, "tool_calls": JSON})
WILD_HTTP_MESSAGES = weighted((6, st.lists(WILD_HTTP_MESSAGE, max_size=4)), (1, JSON),
                              (1, st.sampled_from([60, 3000]).map(lambda n: [
                                  {"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(n)]
                                  + [{"role": "user", "content": "hi"}])))
HTTP_OPTIONAL = {
    "max_tokens": (st.sampled_from([ABSENT, 1, 2, None]), HTTP_INT),
    "temperature": (st.one_of(st.sampled_from([ABSENT, 0, 0.7, None]), st.floats(0, 2)), HTTP_NUMBER),
    "top_p": (st.one_of(st.sampled_from([ABSENT, 0.9, 1]), st.floats(0, 1, exclude_min=True)), HTTP_NUMBER),
    "top_k": (st.one_of(st.sampled_from([ABSENT, -1, 0, 40]), st.integers(-1, 2**31 - 1)), HTTP_INT),
    "seed": (st.one_of(st.just(ABSENT), st.integers(0, 2**64 - 1)), HTTP_INT),
    "stop": (st.sampled_from([ABSENT, "\n", [".", "!"], []]),
             weighted((3, st.one_of(ANY_TEXT, st.lists(ANY_TEXT, max_size=MAX_STOP_STRINGS + 1))), (1, JSON))),
    "stream": (st.sampled_from([ABSENT, False, True]), JSON),
    "stream_options": (st.just(ABSENT), weighted(
        (3, st.fixed_dictionaries({}, optional={"include_usage": weighted((3, st.booleans()), (1, JSON))})),
        (1, JSON))),
    "metadata": (st.one_of(st.just(ABSENT), GOOD_TAGS), weighted((3, st.dictionaries(ANY_TEXT, ANY_TEXT,
                                                                                     max_size=MAX_TAGS + 1)),
                                                               (1, JSON))),
    "user": (st.sampled_from([ABSENT, "u-17"]), weighted((2, ANY_TEXT), (1, JSON))),
    "session_id": (st.sampled_from([ABSENT, "s-1"]), weighted((2, ANY_TEXT), (1, JSON))),
    "n": (st.sampled_from([ABSENT, 1]), weighted((1, st.just(2)), (1, JSON))),
    "logprobs": (st.sampled_from([ABSENT, False]), JSON),
    "response_format": (st.sampled_from([ABSENT, {"type": "text"}]), weighted((1, st.just({"type": "json_object"})),
                                                                              (1, JSON))),
    "presence_penalty": (st.sampled_from([ABSENT, 0]), HTTP_NUMBER),
    "unknown": (st.just(ABSENT), st.tuples(ANY_TEXT, JSON)),
}
HTTP_MODEL = weighted((2, ANY_TEXT), (1, JSON), (1, st.sampled_from(["", "x" * 257, MODEL.upper()])))
RAW_BODIES = [b"", b"{", b"nul", b"[]", b"null", b"1", b'"x"', b"\xff\xfe\x00", b"{\"model\": \"\xff\"}",
              b"[" * 100_000 + b"]" * 100_000, b"{\"a\":" * 50_000 + b"1" + b"}" * 50_000,
              b"{\"max_tokens\": " + b"9" * 5000 + b"}", b"{\"temperature\": 1e999}", b"{\"top_p\": NaN}",
              b"{\"model\": \"\\ud800\", \"prompt\": \"\\udfff\"}", '{"model": "\u00e9"}'.encode("utf-16"),
              b"\xef\xbb\xbf{}", b"{\"model\": 1, \"model\": 2}"]
"""Bodies no JSON encoder writes: broken, nested 100,000 deep, 5,000-digit numbers, bad encodings."""


def http_body_fields(path: str) -> dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]:
    if path == "/v1/chat/completions":
        inputs = {"messages": (st.lists(GOOD_HTTP_MESSAGE, min_size=1, max_size=3), WILD_HTTP_MESSAGES),
                  "max_completion_tokens": (st.sampled_from([ABSENT, ABSENT, 1, 2]), HTTP_INT)}
    else:
        inputs = {"prompt": (st.one_of(SOME_TEXT, st.lists(SOME_TEXT, min_size=1, max_size=1)),
                             weighted((4, ANY_TEXT), (1, st.lists(ANY_TEXT, max_size=2)), (1, JSON)))}
    return {"model": (st.just(MODEL), HTTP_MODEL), **inputs, **HTTP_OPTIONAL}


@st.composite
def http_bodies(draw: st.DrawFn, path: str) -> Any:  # noqa: ANN401
    """A body for a generation endpoint: mostly a valid one with a few wild fields; junk; or raw bytes."""
    kind = draw(st.sampled_from(["shaped"] * 10 + ["junk", "raw"]))
    if kind == "junk":
        return draw(JSON)
    if kind == "raw":
        return draw(st.sampled_from(RAW_BODIES))
    f = draw(mutated(http_body_fields(path)))
    unknown = f.pop("unknown")
    body = {name: value for name, value in f.items() if value is not ABSENT}
    if unknown is not ABSENT:
        body[unknown[0]] = unknown[1]
    return body


@dataclass
class HttpCase:
    method: str
    path: str
    body: Any
    """A JSON-able value, raw bytes, or None (no body)."""
    key_kind: str
    headers: list[tuple[str, bytes]]
    timeout_s: float | None
    """X-Request-Timeout, when the case sends a valid one."""

    def encoded(self) -> bytes | None:
        if self.body is None or isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def http_call(fuzzed: Fuzzed, case: HttpCase) -> HttpAnswer:
    host, port = fuzzed.host_port
    connection = http.client.HTTPConnection(host, port, timeout=NO_DEADLINE_S)
    try:
        connection.putrequest(case.method, case.path, skip_accept_encoding=True)
        body = case.encoded()
        for name, value in case.headers:
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return HttpAnswer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


HTTP_KEY_KINDS = st.sampled_from(["broke", "slow", "admin", "revoked", "none", "unknown", "basic", "empty", "latin1",
                                  "utf8", "bytes"])
HTTP_VALID_KEY_KINDS = {"main", "broke", "slow", "admin"}
TIMEOUTS = [b"0.001", b"0.05", b"0.3", b"1", b"1e300", b"1e-300"]
BAD_TIMEOUTS = [b"0", b"-1", b"nan", b"inf", b"-inf", b"soon", b"", b"1,5", b"\xff", b"1e400"]
IDEMPOTENCY_KEYS = [b"order-17", b"r1", b"", b"a" * 129, b"has space", b"\xc3\xbc", b"\xff\xfe", b"\x80", b"{x}"]


def _authorization(fuzzed: Fuzzed, kind: str) -> bytes | None:
    if kind in fuzzed.api_keys:
        return f"Bearer {fuzzed.api_keys[kind]}".encode()
    return {"none": None, "unknown": b"Bearer fw_00000000_notakey", "basic": b"Basic abc", "empty": b"Bearer ",
            "latin1": "Bearer cl\u00e9".encode("latin-1"), "utf8": "Bearer cl\u00e9\U0001F511".encode(),
            "bytes": b"Bearer \xff\xfe\x80"}[kind]


ENDPOINTS = [("POST", "/v1/chat/completions")] * 6 + [("POST", "/v1/completions")] * 5 + [
    ("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("GET", "/v1/models/no-such"), ("GET", "/v1/models/%FF"),
    ("GET", "/v1/models/%F0%9F%98%80"), ("GET", "/v1/chat/completions"), ("PUT", "/v1/completions"),
    ("POST", "/v1/embeddings"), ("GET", "/health"), ("POST", "/v1/chat/completions/"), ("GET", "/v1/%ED%A0%80")]
HTTP_HEADER_FIELDS = {
    "key_kind": (st.just("main"), HTTP_KEY_KINDS),
    "timeout": (st.just(None), weighted((3, st.sampled_from(TIMEOUTS)), (1, st.sampled_from(BAD_TIMEOUTS)))),
    "idempotency_key": (st.just(None), st.sampled_from(IDEMPOTENCY_KEYS)),
}


@st.composite
def http_cases(draw: st.DrawFn, fuzzed: Fuzzed) -> HttpCase:
    method, path = draw(st.sampled_from(ENDPOINTS))
    body = draw(http_bodies(path)) if method == "POST" else None
    f = draw(mutated(HTTP_HEADER_FIELDS))
    headers = []
    if (authorization := _authorization(fuzzed, f["key_kind"])) is not None:
        headers.append(("Authorization", authorization))
    if f["timeout"] is not None:
        headers.append(("X-Request-Timeout", f["timeout"]))
    if f["idempotency_key"] is not None:
        headers.append(("Idempotency-Key", f["idempotency_key"]))
    case = HttpCase(method, path, body, f["key_kind"], headers,
                    float(f["timeout"]) if f["timeout"] in TIMEOUTS else None)
    make_http_cheap(case)
    return case


def make_http_cheap(case: HttpCase) -> None:
    """As make_cheap: a body the edge would run generates at most CHEAP_MAX_TOKENS."""
    if not isinstance(case.body, dict) or case.path not in ("/v1/chat/completions", "/v1/completions"):
        return
    parse = openai_api.chat_request if case.path == "/v1/chat/completions" else openai_api.completion_request
    try:
        parsed = parse(case.body)
    except Exception:  # noqa: BLE001 - refused before it runs
        return
    make_cheap(parsed.message, case.timeout_s)  # type: ignore[arg-type]
    if parsed.message.sampling.HasField("max_tokens"):
        name = "max_completion_tokens" if case.body.get("max_completion_tokens") is not None else "max_tokens"
        case.body[name] = parsed.message.sampling.max_tokens


HTTP_STATUSES = {200, 400, 401, 403, 404, 405, 409, 429, 504}


def check_http(case: HttpCase, answer: HttpAnswer) -> None:
    context = f"{case.method} {case.path} -> {answer.status}: {answer.body[:300]!r}"
    assert answer.status != 500, context
    allowed = HTTP_STATUSES if case.timeout_s is not None else HTTP_STATUSES - {504}
    assert answer.status in allowed, context
    if answer.status == 429:
        assert case.key_kind in REFUSED_BY_QUOTA or refused_for_leaked_slots(
            case.key_kind, json.loads(answer.body)["error"]["message"]), context
    generation = case.path in ("/v1/chat/completions", "/v1/completions") and case.method == "POST"
    needs_key = case.path.startswith("/v1/models") or generation
    if needs_key and answer.status != 404:
        assert (answer.status == 401) == (case.key_kind not in HTTP_VALID_KEY_KINDS), context
    if answer.status != 200:
        assert answer.headers.get("content-type", "").startswith("application/json"), context
        assert_openai_error(json.loads(answer.body), context)
        return
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        check_events(answer.body, context)
    else:
        json.loads(answer.body)


def assert_openai_error(body: Any, context: str) -> None:  # noqa: ANN401
    assert isinstance(body, dict) and set(body) == {"error"}, context
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, context
    assert isinstance(error["message"], str) and error["message"].strip(), context
    assert len(error["message"].encode()) < MAX_ANSWER_MESSAGE_BYTES, context
    assert isinstance(error["type"], str) and isinstance(error["code"], str), context
    assert error["param"] is None or (isinstance(error["param"], str) and len(error["param"]) < 200), context


def check_events(raw: bytes, context: str) -> None:
    """A stream: JSON events, ending with [DONE] or with an OpenAI error event."""
    events = [line for line in raw.split(b"\n\n") if line]
    assert events and all(line.startswith(b"data: ") for line in events), context
    *chunks, last = [line.removeprefix(b"data: ") for line in events]
    for chunk in chunks:
        assert "error" not in json.loads(chunk), context
    if last != b"[DONE]":
        assert_openai_error(json.loads(last), context)
        assert json.loads(last)["error"]["code"] != "internal", context


def test_the_http_edge_answers_every_request_with_a_status_and_an_openai_error(fuzzed: Fuzzed) -> None:
    @fuzz_settings(250)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(http_cases(fuzzed))
        fuzzed.cases[f"http.{case.method} {case.path}"] += 1
        answer = http_call(fuzzed, case)
        fuzzed.outcomes[f"{case.method} {case.path} {answer.status}"] += 1
        check_http(case, answer)
    run()
    assert_nothing_held(fuzzed)


# --- nothing left held -------------------------------------------------------------------------------------------


@dataclass
class Held:
    """What is left after the cases, by whether its run reached a worker."""

    ran: list[str] = field(default_factory=list)
    """Held for runs that have a usage record (or by the worker): always a failure."""
    never_ran: list[str] = field(default_factory=list)
    """Held for runs that never reached a worker and left no record (once, a run cancelled while its admission's
    scripts were in flight, or while its journal entry was written, lost what they took)."""

    def failures(self) -> list[str]:
        return self.ran + (self.never_ran if STRICT else [])


STRICT = os.environ.get("FAREWAY_FUZZ_STRICT", "1") != "0"
"""Fail on what runs that never reached a worker leave held too (FAREWAY_FUZZ_STRICT=0: warn)."""
PROJECT = "app"
"""The project of every fuzzed key."""


def _held(fuzzed: Fuzzed) -> Held:
    """What the fuzzed tenants still hold in Redis, and what the worker still runs."""
    client = redis.Redis.from_url(fuzzed.stack.redis_url, decode_responses=True)
    held = Held()

    def note(team: str, request_id: str, what: str) -> None:
        ran = client.exists(keys.recorded(team, PROJECT, request_id))
        (held.ran if ran else held.never_ran).append(what)
    try:
        for team in fuzzed.teams.values():
            for entry in client.hkeys(keys.reservations(team)):
                note(team, entry.split(":", 1)[1], f"{team} budget reservation {entry}")
            for key in client.scan_iter(match=f"fw:{{{team}}}:inflight:*"):
                for request_id in client.zrange(key, 0, -1):
                    note(team, request_id, f"{key} concurrency slot {request_id}")
            for key in client.scan_iter(match=f"fw:{{{team}}}:idem:*"):
                if client.hget(key, "state") == "running":
                    note(team, key.split(":", 4)[4], f"{key} running claim")
            spend = client.hgetall(keys.spend(team, month_of(time.time())))
            reserved = {name: int(value) for name, value in spend.items() if ":reserved_" in name and int(value)}
            if reserved:
                # What the reservations hold, summed: left over only with them.
                (held.ran if not client.hlen(keys.reservations(team)) else held.never_ran).append(
                    f"{team} reserved spend {reserved}")
        for key in client.scan_iter(match="fw:{gateway:*}:journal"):
            for call_id, text in client.hgetall(key).items():
                entry = json.loads(text)
                if entry["team"] in fuzzed.teams.values():
                    note(entry["team"], entry["request_id"], f"{key} run {call_id}")
    finally:
        client.close()
    with grpc.insecure_channel(fuzzed.stack.worker_address) as channel:
        load = worker_pb2_grpc.WorkerServiceStub(channel).GetLoad(wpb.GetLoadRequest())
    # Blocks of finished requests are free (cached prefixes among them: kept for reuse, held by no one), so
    # nothing running means no block used.
    if (load.num_running, load.num_waiting, load.kv_blocks_used, load.kv_tokens_used) != (0, 0, 0, 0):
        held.ran.append(f"worker running={load.num_running} waiting={load.num_waiting} "
                        f"kv_blocks_used={load.kv_blocks_used} kv_tokens_used={load.kv_tokens_used} "
                        f"(cached {load.kv_blocks_cached})")
    return held


def assert_nothing_held(fuzzed: Fuzzed) -> None:
    # Records and settlements are written behind the answers: give them a moment.
    wait_until(lambda: not _held(fuzzed).failures(), timeout=20)
    held = _held(fuzzed)
    assert held.failures() == []
    if held.never_ran:
        warnings.warn(f"{len(held.never_ran)} held by runs cancelled before they reached a worker "
                      f"(FAREWAY_FUZZ_STRICT=0 lets them pass): {held.never_ran[:5]}", stacklevel=1)
    statuses = {r.status for team in fuzzed.teams.values() for r in fuzzed.stack.records(team)}
    assert statuses <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, statuses


# --- FOUND ---------------------------------------------------------------------------------------------------------
# Requests this fuzzing found answered INTERNAL or UNKNOWN (each comment says why), pinned: each is INVALID_ARGUMENT.


def _set_budget(hard_usd: float) -> Callable[[Fuzzed, Any], Any]:
    return lambda f, stubs: stubs.accounting.SetBudget(
        apb.SetBudgetRequest(budget=apb.Budget(team=f.acct_teams[1], hard_usd=hard_usd)),
        metadata=grpc_metadata(f, "admin"), timeout=30)


def _report_since(seconds: int, nanos: int) -> Callable[[Fuzzed, Any], Any]:
    def call_(f: Fuzzed, stubs: Any) -> Any:  # noqa: ANN401
        stubs.gateway.Generate(pb.GenerateRequest(model=MODEL, prompt="hi", sampling=pb.SamplingParams(max_tokens=1)),
                               metadata=grpc_metadata(f, "admin"), timeout=60)  # usage to report on
        request = apb.GetUsageReportRequest(group_by=["day"], since=timestamp_pb2.Timestamp(seconds=seconds,
                                                                                              nanos=nanos))
        return stubs.accounting.GetUsageReport(request, metadata=grpc_metadata(f, "admin"), timeout=30)
    return call_


def _undecodable(f: Fuzzed, stubs: Any) -> Any:  # noqa: ANN401
    """A GenerateRequest whose model is not UTF-8 (what a client in another language can send)."""
    generate = stubs.channel.unary_unary("/fareway.inference.v1.InferenceService/Generate",
                                         request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
    return generate(b"\x0a\x02\xff\xfe\x12\x02hi", metadata=grpc_metadata(f, "main"), timeout=30)


FOUND = {
    # fareway/quota.py Budget.__post_init__ takes inf (`not value >= 0` is False for it); Budget.encode's
    # round(usd * 1e9) then raises OverflowError: INTERNAL. Fix: require math.isfinite (and a bound).
    "SetBudget hard_usd=inf": _set_budget(math.inf),
    "SetBudget hard_usd=1e300": _set_budget(1e300),
    # accounting/exports.py Period.parse: (first + timedelta(days=32)) overflows past year 9999: INTERNAL.
    "ExportChargeback period 9999-12": lambda f, stubs: stubs.accounting.ExportChargeback(
        apb.ExportChargebackRequest(period="9999-12"), metadata=grpc_metadata(f, "admin"), timeout=30),
    # accounting/service.py GetUsageReport: Timestamp.ToMicroseconds raises ValueError for nanos outside
    # [0, 1e9) or seconds outside years 1-9999: INTERNAL. Fix: check both and answer INVALID_ARGUMENT.
    "GetUsageReport since with negative nanos": _report_since(0, -5),
    # accounting/rollups.py: strftime("%Y") writes years before 1000 unpadded ("1-01-01T00"), bucket_start's
    # {7: "m", 13: "h"}[len(name)] raises KeyError: INTERNAL. (And the hour-by-hour tiling of a long range
    # grouped by day blocks the event loop: 50 years ~5.5 s, year 1000 on would be minutes.)
    "GetUsageReport since year 1": _report_since(-62135596800, 0),
    # accounting/ledger.py records: a `since` before 1970 makes an XRANGE id "-86399500-0" that Redis refuses
    # (ResponseError): INTERNAL.
    "GetUsageReport since 1969": _report_since(-86400, 500_000_000),
    # grpc answers a request it cannot parse (a string field that is not UTF-8) UNKNOWN ("Unexpected <class
    # DecodeError>"). Fix: fareway/errors.py mapping_errors could wrap request_deserializer so that a
    # DecodeError becomes INVALID_ARGUMENT.
    "a request that is not UTF-8": _undecodable,
    # fareway/auth.py validate_name: `^...$` lets a trailing newline through (fullmatch, as fareway/validation.py
    # now does).
    "CreateApiKey team with a trailing newline": lambda f, stubs: stubs.accounting.CreateApiKey(
        apb.CreateApiKeyRequest(team="team\n", project="app"), metadata=grpc_metadata(f, "admin"), timeout=30),
    # accounting/admin.py set_limits / set_budget never validate_name the team or project: any text (1 MiB,
    # "a}b" that breaks keys.team_of, newlines) becomes a Redis key.
    "SetLimits team that is no name": lambda f, stubs: stubs.accounting.SetLimits(
        apb.SetLimitsRequest(limits=apb.Limits(team="a}b\n", requests_per_minute=1)),
        metadata=grpc_metadata(f, "admin"), timeout=30),
    # fareway/quota.py Limits: `not weight > 0` takes inf; fair-share counters divided by it become 0 (and by a
    # tiny one inf, then NaN). Fix: require a finite weight.
    "SetLimits weight=inf": lambda f, stubs: stubs.accounting.SetLimits(
        apb.SetLimitsRequest(limits=apb.Limits(team=f.acct_teams[2], weight=math.inf)),
        metadata=grpc_metadata(f, "admin"), timeout=30),
}


@dataclass
class Stubs:
    channel: grpc.Channel
    gateway: Any
    accounting: Any


@pytest.mark.parametrize("case", list(FOUND))
def test_what_fuzzing_found_is_invalid_argument(fuzzed: Fuzzed, gateway: Any, accounting: Any, case: str) -> None:  # noqa: ANN401
    with grpc.insecure_channel(fuzzed.stack.gateway_address) as channel:
        stubs = Stubs(channel, gateway, accounting)
        try:
            FOUND[case](fuzzed, stubs)
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, f"{error.code().name}: {error.details()}"
            return
    pytest.fail("answered OK")
