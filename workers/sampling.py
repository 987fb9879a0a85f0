"""Choosing the next token from logits, batched over the step's sequences.

In vLLM's order: end-of-sequence and stop tokens are barred from rows short of their min_tokens;
logit_bias is added; repetition, frequency and presence penalties are applied (the repetition penalty
over the prompt and the output, the other two over the output, as OpenAI's); a structured output's
token mask bars what its grammar does not allow next; greedy rows then take the most likely token;
the others divide by their temperature, keep their top_k, top_p and min_p tokens and draw one. Each
stage runs on the whole step's rows at once, and only when some row asks for it: a step of greedy
rows with no penalties is one argmax.

A sampled row draws from its own generator (seeded from the request, or at random), by the
exponential race: argmax(p / q) with q ~ Exp(1) drawn from the row's generator is a draw from p
(as vLLM samples).
So a seeded request gives the same text whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from workers.engine.sequence import Logprobs, SamplingOptions

History = tuple[Sequence[int], int]
"""A row's token ids so far (prompt, then output) and how many of them are the prompt."""


def logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor, top: Sequence[int]) -> list[Logprobs]:
    """logits: [R, vocab] raw; token_ids: [R], the token at each row's position; top: how many of the
    most likely tokens each row lists -> each token's log-probability and rank and the row's most
    likely tokens, computed for every row at once."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    k = max(top, default=0)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], token_ids[:, None][:, :0])
    return [Logprobs(token, value, rank, tuple(zip(ids[:count], values[:count])))
            for token, value, rank, ids, values, count in zip(
                token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist(), top)]


def sample(logits: torch.Tensor, options: list[SamplingOptions], generators: list[torch.Generator | None],
           histories: list[History] | None = None, eos_token_ids: Collection[int] = (),
           constrain: Callable[[torch.Tensor], None] | None = None) -> list[int]:
    """logits: [B, vocab] fp32, one row per sequence -> one token id per row. `histories` is needed
    when a row has penalties or min_tokens; `eos_token_ids` when a row has min_tokens; `constrain`
    masks the rows of structured outputs in place (after the penalties, before temperature)."""
    raw = logits
    logits = process(logits, options, histories, eos_token_ids)
    if constrain is not None:
        constrain(logits if logits is not raw else (logits := logits.clone()))  # the caller's logits stay raw
    tokens = logits.argmax(dim=-1)
    sampled = [row for row, opts in enumerate(options) if not opts.is_greedy]
    if not sampled:
        return tokens.tolist()
    rows = torch.tensor(sampled, device=logits.device)
    probs = probabilities(logits.index_select(0, rows), [options[row] for row in sampled])
    # Exp(1) as -log(U): uniform_ is several times cheaper than exponential_ on the CPU.
    races = torch.empty_like(probs)
    for i, row in enumerate(sampled):
        races[i].uniform_(generator=generators[row])
    tokens[rows] = (probs / races.log_().neg_()).argmax(dim=-1)
    return tokens.tolist()


def process(logits: torch.Tensor, options: list[SamplingOptions], histories: list[History] | None,
            eos_token_ids: Collection[int] = ()) -> torch.Tensor:
    """logit_bias, the penalties and min_tokens, for every row at once (a new tensor where any applies)."""
    if histories is not None and any(opts.min_tokens for opts in options):
        rows, ids = [], []
        for row, (opts, (tokens, num_prompt)) in enumerate(zip(options, histories)):
            if len(tokens) - num_prompt < opts.min_tokens:
                banned = {*opts.stop_token_ids, *(() if opts.ignore_eos else eos_token_ids)}
                rows += [row] * len(banned)
                ids += sorted(banned)
        if rows:
            logits = logits.clone()
            logits[torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)] = float("-inf")
    if any(opts.logit_bias for opts in options):
        logits = logits.clone()
        rows = [row for row, opts in enumerate(options) for _ in opts.logit_bias]
        ids = [token for opts in options for token, _ in opts.logit_bias]
        bias = [value for opts in options for _, value in opts.logit_bias]
        logits.index_put_((torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)),
                          torch.tensor(bias, dtype=logits.dtype, device=logits.device), accumulate=True)
    if any(opts.has_penalties for opts in options):
        if histories is None:
            raise ValueError("penalties need each row's token history")
        logits = penalized(logits, options, histories)
    return logits


def penalized(logits: torch.Tensor, options: list[SamplingOptions], histories: list[History]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (a logit above 0 divided by it, one below
    multiplied), then frequency x (times in the output) and presence x (in the output at all) taken off."""
    batch, vocab = logits.shape
    device = logits.device
    longest = max(len(tokens) for tokens, _ in histories)
    # Padded with `vocab`, a column past the vocabulary that is cut off after the scatter.
    every = torch.full((batch, longest), vocab, dtype=torch.long)
    output = torch.full((batch, longest), vocab, dtype=torch.long)
    for row, (tokens, num_prompt) in enumerate(histories):
        every[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        output[row, :len(tokens) - num_prompt] = torch.tensor(tokens[num_prompt:], dtype=torch.long)
    every, output = every.to(device), output.to(device)
    counts = torch.zeros(batch, vocab + 1, dtype=logits.dtype, device=device)
    counts.scatter_add_(1, output, torch.ones_like(output, dtype=logits.dtype))
    counts = counts[:, :vocab]
    seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device).scatter_(1, every, True)[:, :vocab]
    repetition = torch.tensor([o.repetition_penalty for o in options], dtype=logits.dtype, device=device)[:, None]
    frequency = torch.tensor([o.frequency_penalty for o in options], dtype=logits.dtype, device=device)[:, None]
    presence = torch.tensor([o.presence_penalty for o in options], dtype=logits.dtype, device=device)[:, None]
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, repeated, logits)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def probabilities(logits: torch.Tensor, options: list[SamplingOptions]) -> torch.Tensor:
    """The distribution each sampled row draws from: temperature, then top_k, top_p and min_p."""
    device = logits.device
    temperature = torch.tensor([o.temperature for o in options], dtype=logits.dtype, device=device)[:, None]
    logits = logits / temperature
    vocab = logits.shape[-1]
    if any(o.top_k and o.top_k < vocab for o in options):
        top_k = torch.tensor([o.top_k if o.top_k and o.top_k < vocab else vocab for o in options], device=device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (top_k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(o.top_p < 1.0 for o in options):
        top_p = torch.tensor([o.top_p for o in options], dtype=probs.dtype, device=device)[:, None]
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if any(o.min_p > 0 for o in options):
        min_p = torch.tensor([o.min_p for o in options], dtype=probs.dtype, device=device)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs
