"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Each sampled sequence draws from its own generator, seeded from the request,
so a seeded request gives the same text whatever else is in the batch.
"""

from __future__ import annotations

import torch

from workers.engine.sequence import SamplingOptions


def sample(logits: torch.Tensor, options: list[SamplingOptions],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits: [B, vocab] fp32, one row per sequence -> one token id per row."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (opts, generator) in enumerate(zip(options, generators)):
        if not opts.is_greedy:
            tokens[row] = _sample_row(logits[row], opts, generator)
    return tokens


def _sample_row(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> int:
    # logits: [vocab]
    scaled = logits / opts.temperature
    if opts.top_k and opts.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, opts.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if opts.top_p < 1.0:
        probs = _top_p(probs, opts.top_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
