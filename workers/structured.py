"""Structured outputs: a request's constraint (a JSON schema, any JSON object, a regex, a GBNF grammar
or a choice of strings) compiled for the model's vocabulary by xgrammar, and a matcher per sequence
that says which tokens may come next.

xgrammar was chosen over llguidance by measurement on the 2-core CPU, with SmolLM2's 49,152-token
vocabulary (docs/structured-outputs.md has the figures): both compile all five kinds, but xgrammar
fills a sequence's token mask in 2.5 us (median while walking a JSON document; llguidance: 27 us)
and at worst 0.12 ms (llguidance: 1.8 ms), and its batched mask application takes 0.27 ms for
16 rows (llguidance's CPU path: 279 ms). Its native code releases the GIL, so the step's masks are
filled on a thread of their own while the forward pass runs (workers/model_runner.py).

A mask is a bitmask, one bit per token of the logits' width, one row per sampled row; a row left as
allocated allows every token. Tokens past the tokenizer (the embedding's padding) and the
tokenizer's added tokens are never allowed by a grammar; the end-of-sequence tokens are allowed
exactly where the constraint is complete.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import xgrammar

from workers.tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
_MESSAGE_CHARS = 400
# xgrammar's messages start with the time and its C++ source line: "[22:08:06] /project/cpp/x.cc:94: ".
_SOURCE_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")


class GrammarError(ValueError):
    """A constraint that does not compile: the compiler's message, cut to a few hundred characters."""


@dataclass(frozen=True)
class Constraint:
    kind: str
    """One of KINDS."""
    spec: str
    """The schema's JSON text, the regex or the grammar; for a choice, a JSON list of the strings;
    "" for json_object."""


class Matcher:
    """One sequence's place in its constraint."""

    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self._matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the tokens allowed next into row `row` of the bitmask."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advances past the token; False (nothing changes) if the constraint does not allow it."""
        return self._matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        """The constraint is complete and nothing may follow (it took its end-of-sequence token, or
        its structure closed with nothing else allowed)."""
        return self._matcher.is_terminated()

    def copy(self) -> Matcher:
        """A matcher at the same place that goes on independently (a forked sample's)."""
        return Matcher(self._matcher.fork())


class CompiledGrammar:
    """A constraint compiled for one vocabulary; shared by every request with the same constraint."""

    def __init__(self, constraint: Constraint, compiled: xgrammar.CompiledGrammar) -> None:
        self.constraint = constraint
        self._compiled = compiled

    def matcher(self) -> Matcher:
        return Matcher(xgrammar.GrammarMatcher(self._compiled))


class Grammars:
    """Compiles constraints for a model's vocabulary, and keeps the last `cache_size` by content.
    Thread-safe: requests compile on threads of their own."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 256) -> None:
        """`vocab_size`: the logits' width, which may exceed the tokenizer's (padding)."""
        # The raw bytes of every token; an added token (a control token) or padding gets none, which
        # xgrammar treats as a special token no grammar allows.
        added = set(tokenizer.backend.get_added_tokens_decoder())
        encoded = [b"" if i in added or i >= tokenizer.vocab_size else tokenizer.token_bytes(i)
                   for i in range(vocab_size)]
        info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=sorted(tokenizer.eos_token_ids))
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[Constraint, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiled = 0
        """Constraints compiled (cache misses), for tests and metrics."""

    def compile(self, constraint: Constraint) -> CompiledGrammar:
        """The constraint compiled (or from the cache); GrammarError if it does not compile."""
        with self._lock:
            if (hit := self._cache.get(constraint)) is not None:
                self._cache.move_to_end(constraint)
                return hit
        compiled = CompiledGrammar(constraint, self._compile(constraint))
        with self._lock:
            self.num_compiled += 1
            compiled = self._cache.setdefault(constraint, compiled)  # a racing compile of the same: one wins
            self._cache.move_to_end(constraint)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, constraint: Constraint) -> xgrammar.CompiledGrammar:
        kind, spec = constraint.kind, constraint.spec
        try:
            if kind == "json_schema":
                # Compact separators: a small model given free whitespace can spend its tokens on it.
                return self._compiler.compile_json_schema(spec, any_whitespace=False)
            if kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return self._compiler.compile_regex(spec)
            if kind == "grammar":
                return self._compiler.compile_grammar(spec)
            if kind == "choice":
                choices = json.loads(spec)
                rule = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
                return self._compiler.compile_grammar(f"root ::= {rule}")
        except (RuntimeError, ValueError, TypeError) as error:
            raise GrammarError(_capped(str(error))) from None
        raise GrammarError(f"unknown constraint kind {kind[:40]!r}; use one of {', '.join(KINDS)}")


def new_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """A bitmask of `batch` rows that allow every token (int32 [batch, ceil(vocab_size / 32)], on the CPU)."""
    return xgrammar.allocate_token_bitmask(batch, vocab_size)


def apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Sets every logit its row of the bitmask does not allow to -inf, for the whole batch at once."""
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))


def _capped(message: str) -> str:
    message = _SOURCE_PREFIX.sub("", " ".join(message.split()))
    return message if len(message) <= _MESSAGE_CHARS else f"{message[:_MESSAGE_CHARS]}..."
