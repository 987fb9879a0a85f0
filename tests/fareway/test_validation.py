"""Bad requests are refused with INVALID_ARGUMENT naming the field to fix."""

from __future__ import annotations

import pytest

from fareway.errors import InvalidArgument
from fareway.inference.v1 import inference_pb2 as pb
from fareway.validation import validate_generate


def request(**sampling) -> pb.GenerateRequest:  # noqa: ANN003
    return pb.GenerateRequest(model="m", prompt="hi", sampling=pb.SamplingParams(**sampling))


def chat(*messages: tuple[str, str]) -> pb.GenerateRequest:
    r = pb.GenerateRequest(model="m")
    for role, content in messages:
        r.chat.messages.add(role=role, content=content)
    if not messages:
        r.chat.SetInParent()
    return r


@pytest.mark.parametrize(("bad", "field"), [
    (pb.GenerateRequest(prompt="hi"), "model"),
    (pb.GenerateRequest(model="m"), "prompt"),
    (pb.GenerateRequest(model="m", prompt=""), "prompt"),
    (request(max_tokens=0), "sampling.max_tokens"),
    (request(max_tokens=-5), "sampling.max_tokens"),
    (request(temperature=-0.1), "sampling.temperature"),
    (request(temperature=float("nan")), "sampling.temperature"),
    (request(top_p=0.0), "sampling.top_p"),
    (request(top_p=1.5), "sampling.top_p"),
    (request(top_k=-1), "sampling.top_k"),
    (request(stop=[""]), "sampling.stop"),
    (request(min_p=1.5), "sampling.min_p"),
    (request(presence_penalty=2.5), "sampling.presence_penalty"),
    (request(frequency_penalty=float("nan")), "sampling.frequency_penalty"),
    (request(repetition_penalty=0.0), "sampling.repetition_penalty"),
    (request(logit_bias={5: 101.0}), "sampling.logit_bias"),
    (request(logit_bias={n: 1.0 for n in range(301)}), "sampling.logit_bias"),
    (chat(), "chat.messages"),
    (chat(("wizard", "hi")), "chat.messages[0].role"),
    (chat(("user", "hi"), ("assistant", "")), "chat.messages[1].content"),
    (pb.GenerateRequest(model="m", prompt="hi", request_id="has space"), "request_id"),
    (pb.GenerateRequest(model="m", prompt="hi", tags={"bad key": "v"}), "tags"),
    # Matched whole: `$` let a trailing newline through.
    (pb.GenerateRequest(model="m", prompt="hi", request_id="id\n"), "request_id"),
    (pb.GenerateRequest(model="m", prompt="hi", session_id="s\n"), "session_id"),
    (pb.GenerateRequest(model="m", prompt="hi", tags={"k\n": "v"}), "tags"),
    # So small the sampler's logits overflow to infinities, failing every request in the engine step.
])
def test_bad_input_names_its_field(bad: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_generate(bad)
    assert caught.value.field == field
    assert caught.value.message


def test_good_requests_pass() -> None:
    validate_generate(request(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, stop=["\n"]))
    validate_generate(chat(("system", "be brief"), ("user", "hi")))
    validate_generate(request(temperature=1e-38))   # greedy, as in vLLM (workers/engine/sequence.py)
    validate_generate(request(temperature=3.4e38))
