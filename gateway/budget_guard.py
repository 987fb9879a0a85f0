"""Budget admission: before a request runs, its maximum cost is held against
its team's and project's monthly budgets (fareway/quota.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

from accounting.pricebook import NANO_USD_PER_USD, PriceBook
from fareway.auth import Tenant
from fareway.errors import ResourceExhausted
from fareway.inference.v1 import inference_pb2 as pb
from fareway.quota import BudgetRefused, Budgets, Reservation

log = logging.getLogger(__name__)

# Chat templates wrap each message in a few special tokens (role markers, separators).
_TEMPLATE_TOKENS_PER_MESSAGE = 8
_TEMPLATE_TOKENS = 16


def max_prompt_tokens(request: pb.GenerateRequest | pb.GenerateStreamRequest) -> int:
    """An upper bound on the prompt's tokens without tokenizing it.

    Byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2, GPT-style) never emit
    a token for less than one byte of text, so the UTF-8 length bounds the
    text's tokens; the template adds a few special tokens per message.
    """
    if request.WhichOneof("input") == "prompt":
        return len(request.prompt.encode()) + _TEMPLATE_TOKENS
    messages = request.chat.messages
    return (sum(len(m.content.encode()) + len(m.role.encode()) for m in messages)
            + _TEMPLATE_TOKENS_PER_MESSAGE * len(messages) + _TEMPLATE_TOKENS)


@dataclass(frozen=True)
class BudgetGuard:
    budgets: Budgets
    cost_reserve_usd_per_million_tokens: float
    """What a "cost" (cost to serve) budget holds per token while a request runs: an estimate,
    since GPU time is only known afterwards. "list" budgets hold an exact upper bound."""

    def admit(self, tenant: Tenant, request_id: str, request: pb.GenerateRequest | pb.GenerateStreamRequest,
              book: PriceBook, context_length: int,
              claim: tuple[str, str] | None = None) -> Coroutine[Any, Any, Reservation | None]:
        """Reserves the request's maximum cost; raises RESOURCE_EXHAUSTED naming the budget it would pass.
        With `claim`, holds nothing (None) unless the request_id's claim is this run's.

        The reservation is queued before this returns (fareway/redis/batch.py), so Redis calls queued
        before awaiting the result share its round trip."""
        prompt = max_prompt_tokens(request)
        completion = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else context_length
        completion = max(0, min(completion, context_length))
        now = time.time()
        price = book.model_price(request.model, now)
        max_list = price.list_price_nusd(prompt, 0, completion) if price else 0
        max_cost = round((prompt + completion) * self.cost_reserve_usd_per_million_tokens * NANO_USD_PER_USD / 1e6)
        reserving = self.budgets.reserve_soon(tenant.team, tenant.project, request_id,
                                              max_cost_nusd=max_cost, max_list_nusd=max_list, now=now,
                                              claim=claim)
        return _admitted(reserving, tenant, max_cost_nusd=max_cost, max_list_nusd=max_list)


async def _admitted(reserving: Awaitable[Reservation | None], tenant: Tenant, *, max_cost_nusd: int,
                    max_list_nusd: int) -> Reservation | None:
    try:
        return await reserving
    except BudgetRefused as refused:
        r = refused.refusal
        scope = f"team {tenant.team}" if r.scope == "team" else f"project {tenant.team}/{r.scope[8:]}"
        raise ResourceExhausted(
            f"the monthly {r.basis} budget of {scope} would be passed: ${r.spent_nusd / 1e9:.6f} spent and "
            f"${r.reserved_nusd / 1e9:.6f} held by running requests of ${r.hard_nusd / 1e9:.2f}; this request "
            "may cost up to "
            f"${(max_list_nusd if r.basis == 'list' else max_cost_nusd) / 1e9:.6f} (lower max_tokens, or raise "
            "the budget)",
            subject=f"budget:{tenant.team}" + ("" if r.scope == "team" else f"/{r.scope[8:]}")) from None
