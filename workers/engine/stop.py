"""Stop strings over streamed text.

Text is held back while its tail could still become a stop string, so a
caller never receives text that a later token turns into part of a stop
string: what has been emitted is final.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Adds new text; returns (text safe to emit, the stop string matched or None).

        After a match the emitted text ends just before the stop string.
        """
        buffer = self._held + text
        match = self._earliest_match(buffer)
        if match is not None:
            index, stop = match
            self._held = ""
            return buffer[:index], stop
        keep = self._longest_partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], None

    def flush(self) -> str:
        """The held-back text, at the end of generation."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, buffer: str) -> tuple[int, str] | None:
        """The stop string that completes first (the longest, if several end at once), and where it starts.

        Generation stops as soon as a stop string has been produced, so what
        counts is where a match ends; this keeps the result independent of how
        the text was split into chunks.
        """
        found = []
        for stop in self._stop:
            index = buffer.find(stop)
            if index >= 0:
                found.append((index + len(stop), -len(stop), index, stop))
        if not found:
            return None
        _, _, index, stop = min(found)
        return index, stop

    def _longest_partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best
