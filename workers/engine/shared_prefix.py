"""Prefixes an operator marks as shared across tenants.

By default a cached prefix is reused only by requests with the same cache
salt (the same team), so one team's prompts never shorten another team's
latency. A shared prefix, such as a system prompt every team uses, is cached
once for everyone.
"""

from __future__ import annotations

from collections.abc import Iterable


class SharedPrefixes:
    def __init__(self, prefixes: Iterable[list[int]] = ()) -> None:
        self._prefixes = [tuple(p) for p in prefixes if p]

    def __len__(self) -> int:
        return len(self._prefixes)

    def match(self, token_ids: list[int]) -> int:
        """How many leading tokens of token_ids lie inside a shared prefix (the longest match).

        Compared token by token, not as text: a prefix tokenized on its own may
        end in a different token than inside a longer prompt, and only the
        tokens that agree are shared.
        """
        best = 0
        for prefix in self._prefixes:
            limit = min(len(prefix), len(token_ids))
            length = 0
            while length < limit and prefix[length] == token_ids[length]:
                length += 1
            best = max(best, length)
        return best
