"""The model against the reference: for the same SmolLM2 GGUF, our logits match
transformers' within 1e-3 (fp32, CPU), through the plain and the paged,
chunked paths, and greedy decoding through the engine gives the same tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from workers.config import RunnerConfig, WorkerConfig
from workers.engine.block_manager import BlockManager
from workers.engine.scheduler import ScheduledSequence, StepPlan
from workers.engine.sequence import SamplingOptions, Sequence
from workers.loader import Checkpoint
from workers.model_runner import ModelRunner
from workers.models.llama import build_model
from workers.worker import Worker

pytestmark = pytest.mark.slow

PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "Les GPU accélèrent l'inférence des modèles de langage parce que",
]
ATOL = 1e-3


@pytest.fixture(scope="module")
def model(smollm2: Checkpoint):  # noqa: ANN201
    return build_model(smollm2.config, smollm2.tensors, device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(model, smollm2: Checkpoint, hf_reference, prompt: str) -> None:  # noqa: ANN001
    ids = torch.tensor(smollm2.tokenizer.encode(prompt))
    with torch.inference_mode():
        ours = model.compute_logits(model(ids, torch.arange(len(ids))))
        reference = hf_reference.model(ids[None]).logits[0].float()
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() < ATOL


def test_paged_chunked_prefill_and_decode_match_transformers(smollm2: Checkpoint, hf_reference) -> None:  # noqa: ANN001
    """The serving path: the prompt prefilled in uneven chunks into scattered KV blocks,
    then token by token; each step's last logits equal the reference's at that position."""
    runner = ModelRunner(smollm2, RunnerConfig(device="cpu", kv_cache_memory_bytes=16 << 20, block_size=4, weights="fp32"))
    ids = smollm2.tokenizer.encode(PROMPTS[2])
    seq = Sequence("s", ids, SamplingOptions(max_tokens=8, temperature=0.0), 0.0)
    blocks = BlockManager(runner.num_kv_blocks, runner.block_size)
    blocks.allocate(Sequence("filler", [1] * 13, seq.sampling, 0.0), 13)  # the sequence's blocks do not start at 0
    blocks.allocate(seq, len(ids) + 1)
    captured: list[torch.Tensor] = []
    original = runner.model.compute_logits
    runner.model.compute_logits = lambda hidden: captured.append(original(hidden)) or captured[-1]
    for chunk in (5, 1, 7, len(ids) - 13):
        runner.execute(StepPlan((ScheduledSequence(seq, chunk, seq.num_computed_tokens),)))
        seq.num_computed_tokens += chunk
    with torch.inference_mode():
        reference = hf_reference.model(torch.tensor(ids)[None]).logits[0]
    assert len(captured) == 1  # only the step that completes the prompt computes logits
    assert (captured[0][0] - reference[-1]).abs().max().item() < ATOL


@pytest.fixture(scope="module")
def fp32_worker(smollm2: Checkpoint) -> Iterator[Worker]:
    worker = Worker(WorkerConfig(runner=RunnerConfig(device="cpu", kv_cache_memory_bytes=32 << 20, weights="fp32")),
                    smollm2)
    worker.start()
    yield worker
    worker.stop()


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_greedy_decoding_gives_transformers_tokens(fp32_worker: Worker, smollm2: Checkpoint, hf_reference,  # noqa: ANN001
                                                   prompt: str) -> None:
    ids = smollm2.tokenizer.encode(prompt)
    with torch.inference_mode():
        expected = hf_reference.model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                               pad_token_id=2)[0, len(ids):].tolist()
    assert len(expected) == 64, "pick prompts whose continuation runs 64 tokens"

    async def ours() -> list[int]:
        tokens: list[int] = []
        async for output in fp32_worker.async_engine.generate(ids, SamplingOptions(max_tokens=64, temperature=0)):
            tokens.extend(output.token_ids)
        return tokens
    assert asyncio.run(ours()) == expected


def test_logprobs_and_prompt_logprobs_equal_transformers_log_softmax(fp32_worker: Worker, smollm2: Checkpoint,  # noqa: ANN001
                                                                    hf_reference) -> None:
    """Each reported log-probability, the sampled token's and its top-k alternatives', equals log_softmax
    of transformers' logits at that position within 1e-3."""
    ids = smollm2.tokenizer.encode(PROMPTS[0])

    async def ours() -> list:  # noqa: ANN401
        return [o async for o in fp32_worker.async_engine.generate(
            ids, SamplingOptions(max_tokens=12, temperature=0.8, seed=5, logprobs=5, prompt_logprobs=5))]
    outputs = asyncio.run(ours())
    generated = [t for o in outputs for t in o.token_ids]
    with torch.inference_mode():
        reference = torch.log_softmax(hf_reference.model(torch.tensor([ids + generated])).logits[0].float(), dim=-1)
    positions = [(len(ids) - 1 + i, p) for i, p in enumerate(p for o in outputs for p in o.logprobs)]
    positions += [(i, p) for i, p in enumerate(p for o in outputs for p in o.prompt_logprobs)]
    assert len(positions) == len(generated) + len(ids) - 1
    for row, p in positions:
        expected = reference[row]
        assert p.logprob == pytest.approx(expected[p.token_id].item(), abs=ATOL)
        assert p.rank == int((expected > expected[p.token_id] + ATOL).sum()) + 1 or abs(
            sorted(expected.tolist(), reverse=True)[p.rank - 1] - p.logprob) < ATOL
        for token, value in p.top:
            assert value == pytest.approx(expected[token].item(), abs=ATOL)
        assert [t for t, _ in p.top][:1] == [int(expected.argmax())] or p.top[0][1] == pytest.approx(
            expected.max().item(), abs=ATOL)


def test_the_runner_counts_parameters_and_the_bytes_its_kernels_hold(smollm2: Checkpoint) -> None:
    runner = ModelRunner(smollm2, RunnerConfig(device="cpu", kv_cache_memory_bytes=1 << 20, weights="fp32"))
    tied = smollm2.config.tie_word_embeddings
    expected = sum(t.numel() for name, t in smollm2.tensors.items() if not (tied and name == "lm_head.weight"))
    assert runner.parameter_count == expected
    embedding = smollm2.config.vocab_size * smollm2.config.hidden_size * 4
    # Every weight once in fp32, plus the head's packed copy when the kernels keep one apart from the embedding.
    assert runner.weight_bytes in (expected * 4, expected * 4 + embedding)
    # A decode step reads every weight once (the tied embedding table as the head), never the packed copy twice.
    assert runner.decode_bytes_per_step == expected * 4
    assert runner.max_sequences_at(1000) == runner.num_kv_blocks // 63
