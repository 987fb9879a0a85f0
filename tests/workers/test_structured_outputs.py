"""Structured outputs: the compiled constraints' masks on SmolLM2's vocabulary, and the engine's
outputs under them: every JSON output parses and validates against its schema, regex and choice
outputs match whole, a GBNF grammar's outputs are its sentences, and a preempted request resumes
with its grammar's state."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Iterator

import jsonschema
import pytest
import torch

from tests.workers.test_engine import collect, text, tokens
from workers import structured
from workers.config import RunnerConfig, WorkerConfig
from workers.engine.llm_engine import RequestOutput
from workers.engine.scheduler import SchedulerConfig
from workers.engine.sequence import FinishReason, SamplingOptions
from workers.loader import Checkpoint
from workers.worker import Worker


@pytest.fixture(scope="module")
def grammars(smollm2: Checkpoint) -> structured.Grammars:
    return structured.Grammars(smollm2.tokenizer, smollm2.config.vocab_size)


def allowed(grammars: structured.Grammars, matcher: structured.Matcher) -> list[int]:
    bitmask = structured.new_bitmask(1, grammars.vocab_size)
    matcher.fill(bitmask, 0)
    logits = torch.zeros(1, grammars.vocab_size)
    structured.apply(logits, bitmask)
    return (logits[0] > float("-inf")).nonzero()[:, 0].tolist()


def test_a_choice_allows_exactly_the_tokens_that_keep_a_choice_possible(grammars, smollm2: Checkpoint) -> None:  # noqa: ANN001
    tokenizer = smollm2.tokenizer
    matcher = grammars.compile(structured.Constraint("choice", json.dumps(["yes", "no way"]))).matcher()
    first = allowed(grammars, matcher)
    texts = {tokenizer.token_text(t) for t in first}
    assert texts and all("yes".startswith(t) or "no way".startswith(t) for t in texts)
    assert {"y", "n", "yes"} <= texts
    assert not set(first) & tokenizer.eos_token_ids  # nothing chosen yet
    for token in tokenizer.encode("yes"):
        assert matcher.accept(token)
    assert allowed(grammars, matcher) == sorted(tokenizer.eos_token_ids)  # complete: only the end
    fork = matcher.copy()
    assert fork.accept(tokenizer.eos_token_id) and fork.is_terminated() and not matcher.is_terminated()


def test_compiled_constraints_are_cached_by_content(grammars) -> None:  # noqa: ANN001
    before = grammars.num_compiled
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}})
    first = grammars.compile(structured.Constraint("json_schema", schema))
    assert grammars.compile(structured.Constraint("json_schema", schema)) is first
    assert grammars.num_compiled == before + 1
    assert grammars.compile(structured.Constraint("regex", "[0-9]+")) is not first


@pytest.mark.parametrize(("kind", "spec", "says"), [
    ("json_schema", json.dumps({"type": "no-such-type"}), "Unsupported type"),
    ("json_schema", json.dumps({"type": "object", "description": "x" * 100_000, "properties": 5}), ""),
    ("regex", "(unclosed", "parenthesis"),
    ("grammar", "root ::= undefined_rule", "undefined_rule"),
])
def test_a_constraint_that_does_not_compile_says_why_briefly(grammars, kind: str, spec: str, says: str) -> None:  # noqa: ANN001
    with pytest.raises(structured.GrammarError) as caught:
        grammars.compile(structured.Constraint(kind, spec))
    message = str(caught.value)
    assert 0 < len(message) <= 403 and says in message and "/project/" not in message


SCHEMAS = {
    "nested objects": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                     "city": {"type": "string", "maxLength": 20}},
                   "required": ["name", "city"]}}, "required": ["person"]},
    "arrays": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}},
        "required": ["colors"]},
    "enums": {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                                "confidence": {"enum": ["low", "high"]}},
              "required": ["sentiment", "confidence"]},
    "bounded numbers": {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10},
                                                          "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
                        "required": ["score", "ratio"]},
    "required fields": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                          "ok": {"type": "boolean"},
                                                          "note": {"type": "string", "maxLength": 16}},
                        "required": ["id", "ok"]},
}
PROMPTS = [f"Answer as JSON. {topic}" for topic in (
    "Who lives in Paris?", "Name some colors of the sea.", "How do you feel about rain?", "Rate this movie.",
    "Describe a cat.", "Is the sky blue?", "Pick a number.", "What is in a kitchen?", "Review a pizza.",
    "Tell me about Rome.", "Summarize a meeting.", "Describe the weather.", "Who wrote Hamlet?",
    "Rate your day.", "List fruits.", "Classify: I love it!", "Give a score to a song.", "Describe a dog.",
    "Where is Tokyo?", "Is water wet?")]


@pytest.fixture(scope="module")
def worker(smollm2: Checkpoint) -> Iterator[Worker]:
    w = Worker(WorkerConfig(runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=64 << 20),
                            scheduler=SchedulerConfig(max_num_seqs=40, max_num_batched_tokens=2048)), smollm2)
    w.start()
    yield w
    w.stop()


def run_all(worker: Worker, prompts: list[list[int]], options: list[SamplingOptions]) -> list[list[RequestOutput]]:
    async def together() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(worker, ids, o) for ids, o in zip(prompts, options)))
    return asyncio.run(together())


def chat(worker: Worker, content: str) -> list[int]:
    return worker.tokenizer.encode_chat([{"role": "user", "content": content}])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_output_parses_and_validates_against_its_schema(worker: Worker, name: str) -> None:
    schema = SCHEMAS[name]
    grammar = worker._compile("json_schema", json.dumps(schema))
    prompts = [chat(worker, p) for p in PROMPTS]
    greedy = SamplingOptions(160, temperature=0, grammar=grammar)
    options = [greedy] * len(prompts) + [dataclasses.replace(greedy, temperature=1.0, seed=i) for i in range(len(prompts))]
    for outputs in run_all(worker, prompts + prompts, options):
        assert outputs[-1].finish_reason is FinishReason.STOP, (name, text(outputs))
        jsonschema.validate(json.loads(text(outputs)), schema)


@pytest.mark.slow
def test_regex_choice_and_grammar_outputs_match_whole(worker: Worker) -> None:
    cases = {
        "regex": (r"[0-9]{3}-[0-9]{4}", "Give me a phone number.", lambda out: re.fullmatch(r"[0-9]{3}-[0-9]{4}", out)),
        "choice": (json.dumps(["positive", "negative", "neutral"]), "Classify: what a lovely day!",
                   lambda out: out in ("positive", "negative", "neutral")),
        "grammar": ('root ::= "(" expr ")"\nexpr ::= [0-9]+ | [0-9]+ " + " expr', "Write a sum.",
                    lambda out: re.fullmatch(r"\([0-9]+( \+ [0-9]+)*\)", out)),
    }
    for kind, (spec, question, matches) in cases.items():
        grammar = worker._compile(kind, spec)
        options = [SamplingOptions(40, temperature=t, seed=i, grammar=grammar) for i, t in enumerate((0, 1.0, 1.0))]
        for outputs in run_all(worker, [chat(worker, question)] * 3, options):
            assert matches(text(outputs)), (kind, text(outputs))
            assert outputs[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


@pytest.mark.slow
def test_a_stop_string_and_a_grammar_end_where_the_first_says(worker: Worker) -> None:
    grammar = worker._compile("regex", "(ab){1,30}")
    ids = chat(worker, "Write abab.")
    [outputs] = run_all(worker, [ids], [SamplingOptions(64, temperature=0, grammar=grammar, stop=("bab",))])
    assert text(outputs) == "a" and outputs[-1].finish_reason is FinishReason.STOP_SEQUENCE
    [outputs] = run_all(worker, [ids], [SamplingOptions(64, temperature=0, grammar=grammar, stop=("zz",))])
    assert re.fullmatch("(ab)+", text(outputs)) and outputs[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


@pytest.mark.slow
def test_each_of_n_samples_follows_the_schema(worker: Worker) -> None:
    schema = SCHEMAS["enums"]
    grammar = worker._compile("json_schema", json.dumps(schema))
    [outputs] = run_all(worker, [chat(worker, "How do you feel about rain?")],
                        [SamplingOptions(60, temperature=1.0, seed=3, n=4, grammar=grammar)])
    samples: dict[int, list[RequestOutput]] = {}
    for output in outputs:
        samples.setdefault(output.index, []).append(output)
    assert sorted(samples) == [0, 1, 2, 3]
    for sample in samples.values():
        jsonschema.validate(json.loads(text(sample)), schema)


def test_a_preempted_request_resumes_with_its_grammar_state(tiny_checkpoint) -> None:  # noqa: ANN001
    """The same requests under a JSON constraint, in a roomy pool and in one so small that they are
    preempted and recomputed: the outputs are equal (the tiny model's JSON is nonsense, but valid)."""
    scheduler = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    roomy = Worker(WorkerConfig(worker_id="roomy", scheduler=scheduler,
                                runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=4 << 20)), tiny_checkpoint)
    cramped = Worker(WorkerConfig(worker_id="cramped", scheduler=scheduler, runner=RunnerConfig(
        device="cpu", kv_cache_memory_bytes=12 * 16 * roomy.runner.kv_bytes_per_token)), tiny_checkpoint)
    # At least 16 one-digit items: every output runs past 40 tokens, so they cannot all fit at once.
    schema = json.dumps({"type": "object", "properties": {"items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 16, "maxItems": 20}},
        "required": ["items"]})
    prompts = [roomy.tokenizer.encode(f"Story {i}: " + "once upon a time " * (2 + i)) for i in range(6)]
    results = {}
    for w in (roomy, cramped):
        w.start()
        try:
            grammar = w._compile("json_schema", schema)
            options = [SamplingOptions(64, temperature=1.0, seed=i, grammar=grammar, presence_penalty=0.5)
                       for i in range(len(prompts))]
            results[w.worker_id] = [tokens(outputs) for outputs in run_all(w, prompts, options)]
        finally:
            w.stop()
    assert results["cramped"] == results["roomy"]
    assert cramped.engine.load().num_preemptions > 0
    for ids in results["cramped"]:
        assert roomy.tokenizer.decode(ids).startswith('{"items": [')
