"""Choosing tokens: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import torch

from workers.engine.sequence import SamplingOptions
from workers.sampling import sample


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
