"""Choosing tokens: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import torch

from workers.engine.sequence import SamplingOptions
from workers.sampling import probabilities, process, sample


def draws(logits: torch.Tensor, opts: SamplingOptions, n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [sample(logits[None], [opts], [generator])[0] for _ in range(n)]


LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05]))


def test_greedy_takes_the_most_likely_token() -> None:
    assert sample(torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]]),
                  [SamplingOptions(1, temperature=0.0)] * 2, [None, None]) == [1, 0]


def test_top_k_and_top_p_restrict_the_choice() -> None:
    assert set(draws(LOGITS, SamplingOptions(1, top_k=2), 300)) == {0, 1}
    assert set(draws(LOGITS, SamplingOptions(1, top_p=0.75), 300)) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert set(draws(LOGITS, SamplingOptions(1, top_p=0.5), 100)) == {0}
    assert set(draws(LOGITS, SamplingOptions(1), 2000)) == {0, 1, 2, 3, 4}


def test_temperature_sharpens_and_flattens() -> None:
    cold = draws(LOGITS, SamplingOptions(1, temperature=0.2), 500)
    hot = draws(LOGITS, SamplingOptions(1, temperature=5.0), 500)
    assert cold.count(0) > 450
    assert hot.count(0) < 200


def test_the_same_seed_draws_the_same_tokens() -> None:
    flat = torch.zeros(1000)
    assert draws(flat, SamplingOptions(1), 20, seed=1) == draws(flat, SamplingOptions(1), 20, seed=1)
    assert draws(flat, SamplingOptions(1), 20, seed=1) != draws(flat, SamplingOptions(1), 20, seed=2)


def test_a_temperature_too_small_to_divide_by_is_greedy_and_spares_its_batch() -> None:
    """As in vLLM, below 1e-5 a temperature is greedy: dividing the logits by 1e-38 would overflow them to
    infinities, and the engine step of every request batched with it would fail."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3)) * 10
    tiny, warm = SamplingOptions(4, temperature=1e-38), SamplingOptions(4, temperature=0.8, seed=1)
    tokens = sample(logits, [tiny, warm], [None, torch.Generator().manual_seed(1)])
    assert tokens[0] == int(logits[0].argmax()) and 0 <= tokens[1] < 50


# --- logits processors, against transformers' ------------------------------------------------------------------

VOCAB = 64


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 4


def test_the_repetition_penalty_equals_transformers_over_prompt_and_output() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = random_logits(2)
    histories = [([3, 5, 5, 9, 11], 3), ([1, 2, 3, 4, 60], 1)]
    options = [SamplingOptions(8, repetition_penalty=1.3), SamplingOptions(8, repetition_penalty=0.7)]
    ours = process(logits, options, histories)
    for row, ((tokens, _), opts) in enumerate(zip(histories, options)):
        theirs = RepetitionPenaltyLogitsProcessor(opts.repetition_penalty)(torch.tensor([tokens]), logits[row:row + 1])
        assert torch.allclose(ours[row], theirs[0], atol=1e-5)


def test_logit_bias_equals_transformers_sequence_bias() -> None:
    from transformers import SequenceBiasLogitsProcessor

    logits = random_logits(2, seed=1)
    options = [SamplingOptions(8, logit_bias=((4, 5.0), (7, -100.0))), SamplingOptions(8)]
    ours = process(logits, options, None)
    theirs = SequenceBiasLogitsProcessor({(4,): 5.0, (7,): -100.0})(torch.tensor([[1, 2]]), logits[:1].clone())
    assert torch.allclose(ours[0], theirs[0], atol=1e-5) and torch.equal(ours[1], logits[1])


def test_frequency_and_presence_penalties_count_the_output_only() -> None:
    logits = random_logits(1, seed=2)
    # Token 5 is in the prompt once and the output three times, token 9 in the output once, 3 in the prompt only.
    history = ([3, 5, 5, 9, 5, 5], 2)
    ours = process(logits, [SamplingOptions(8, frequency_penalty=0.5, presence_penalty=0.25)], [history])[0]
    expected = logits[0].clone()
    expected[5] -= 3 * 0.5 + 0.25
    expected[9] -= 1 * 0.5 + 0.25
    assert torch.allclose(ours, expected, atol=1e-6)


def test_top_k_top_p_and_min_p_keep_what_transformers_warpers_keep() -> None:
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = random_logits(3, seed=3)
    options = [SamplingOptions(8, temperature=0.7, top_k=5), SamplingOptions(8, temperature=1.3, top_p=0.6),
               SamplingOptions(8, temperature=1.0, min_p=0.1)]
    kept = probabilities(logits, options) > 0
    warpers = [TopKLogitsWarper(5), TopPLogitsWarper(0.6), MinPLogitsWarper(0.1)]
    for row, (opts, warper) in enumerate(zip(options, warpers)):
        theirs = warper(torch.tensor([[0]]), logits[row:row + 1] / opts.temperature)
        assert torch.equal(kept[row], torch.isfinite(theirs[0])), opts


def test_sampled_rows_are_batched_and_each_seeded_row_reproduces_alone_or_in_a_batch() -> None:
    logits = random_logits(3, seed=4)
    opts = [SamplingOptions(4, temperature=0.9, seed=7), SamplingOptions(4, temperature=0.0),
            SamplingOptions(4, temperature=1.2, top_k=10, min_p=0.05, repetition_penalty=1.2)]
    histories = [([1, 2], 1), ([3, 4], 1), ([5, 6, 7], 2)]

    def generators() -> list[torch.Generator | None]:
        return [torch.Generator().manual_seed(7), None, torch.Generator().manual_seed(9)]
    batch = sample(logits, opts, generators(), histories)
    alone = sample(logits[:1], opts[:1], generators()[:1], histories[:1])
    assert batch[0] == alone[0] and batch[1] == int(logits[1].argmax())
    assert batch == sample(logits, opts, generators(), histories)


def test_draws_follow_the_distribution() -> None:
    counts = torch.bincount(torch.tensor(draws(LOGITS, SamplingOptions(1), 4000, seed=5)), minlength=5) / 4000
    assert torch.allclose(counts, LOGITS.exp(), atol=0.03), counts
