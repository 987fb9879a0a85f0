"""One request inside the engine: its tokens, its KV blocks and its progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"
    """The end-of-sequence token."""
    STOP_SEQUENCE = "stop_sequence"
    """One of the request's stop strings."""
    LENGTH = "length"
    """max_tokens, or the model's context length."""
    CANCELLED = "cancelled"
    ERROR = "error"


GREEDY_BELOW_TEMPERATURE = 1e-5


def sample_id(request_id: str, index: int) -> str:
    """The engine's name for sample `index` of a request (sample 0 is the request's own sequence)."""
    return request_id if index == 0 else f"{request_id}#{index}"


@dataclass(frozen=True)
class Logprobs:
    """One position's log-probabilities under the model's distribution (raw: before the sampling
    parameters or a constraint change it, as vLLM's default)."""

    token_id: int
    logprob: float
    rank: int
    """1 is the most likely token."""
    top: tuple[tuple[int, float], ...]
    """(token id, log-probability) of the most likely tokens, most likely first."""


@dataclass(frozen=True)
class Sampled:
    """What a step sampled for one sequence: one token, or one per sample where the sequence forks."""

    tokens: tuple[int, ...]
    logprobs: tuple[Logprobs, ...] = ()
    """One per token, when the sequence asked for logprobs."""


@dataclass(frozen=True)
class SamplingOptions:
    """Resolved sampling parameters: defaults applied, validated."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 is off."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    """Keep generating past end-of-sequence, up to max_tokens (benchmarks; not exposed in the API)."""
    min_p: float = 0.0
    """Keep only tokens at least this fraction as likely as the likeliest (0 is off)."""
    presence_penalty: float = 0.0
    """Taken off the logit of every token already in the output (OpenAI's, -2 to 2)."""
    frequency_penalty: float = 0.0
    """Taken off the logit of a token once per time it is in the output (OpenAI's, -2 to 2)."""
    repetition_penalty: float = 1.0
    """Divides a positive logit of a token in the prompt or the output, multiplies a negative one (1 is off)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias added to its logit) pairs."""
    min_tokens: int = 0
    """End-of-sequence, stop_token_ids and stop strings cannot end generation before this many tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation also ends at these tokens (kept in the token ids, not in the text)."""
    n: int = 1
    """Samples of the prompt: the first step's logits are sampled n times and the sequence forked."""
    logprobs: int | None = None
    """Each generated token's log-probability and rank, and this many most likely tokens; None: none."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first; None: none."""
    grammar: object | None = None
    """A compiled structured-output constraint (workers/structured.py); None: free text."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            if (value := getattr(self, name)) is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def is_greedy(self) -> bool:
        """Greedy at temperature 0, below GREEDY_BELOW_TEMPERATURE too (as vLLM: dividing the logits by
        less would overflow them to infinities), or with top_k 1."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1


class Sequence:
    """A prompt and what has been generated after it.

    `num_computed_tokens` of `token_ids` have their K and V in the cache; the
    rest are computed by later steps (a prefill may take several, in chunks).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingOptions,
                 arrival_time: float, cache_salt: str = "", num_shared_prefix_tokens: int = 0,
                 index: int = 0) -> None:
        if not prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.request_id = request_id
        self.index = index
        """Which of its request's n samples it is (0 until the request forks)."""
        self.forked = sampling.n == 1
        """Whether its request's samples exist (a request of n > 1 forks when its first token is sampled)."""
        self.matcher = None
        """Its structured-output matcher (workers/structured.py), advanced by every token it takes."""
        self.prompt_logprobs: list = []
        """With sampling.prompt_logprobs: one entry per prompt token after the first, as its prefill computes them."""
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.cache_salt = cache_salt
        """Scopes prefix-cache reuse: only sequences with equal salts share cached blocks."""
        self.num_shared_prefix_tokens = num_shared_prefix_tokens
        """Leading tokens inside an operator-marked shared prefix: cached for every salt."""
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_sequence = ""
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        """Prompt tokens whose KV came from the prefix cache instead of being computed."""
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        """Prefix-cache hashes of the leading blocks that are full and computed."""
        self.num_preemptions = 0
        self.gpu_seconds = 0.0
        self.arrival_time = arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_total_tokens(self) -> int:
        """Tokens the sequence holds if it runs to max_tokens."""
        return self.num_prompt_tokens + self.sampling.max_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def finish(self, reason: FinishReason, stop_sequence: str = "") -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_sequence = stop_sequence
