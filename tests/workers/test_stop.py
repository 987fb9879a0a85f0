"""Stop strings over streamed text: nothing emitted is ever taken back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from workers.engine.stop import StopStringMatcher


def stream(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, str | None]:
    emitted = []
    for chunk in chunks:
        text, matched = matcher.feed(chunk)
        emitted.append(text)
        if matched is not None:
            return "".join(emitted), matched
    return "".join(emitted) + matcher.flush(), None


def test_stop_string_split_across_chunks_is_cut_before_it() -> None:
    assert stream(StopStringMatcher(("###",)), ["Hello #", "#", "# world"]) == ("Hello ", "###")


def test_partial_prefix_that_never_completes_is_released() -> None:
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("go ST") == ("go ", None)
    assert matcher.feed("ART") == ("START", None)


def test_the_stop_string_that_completes_first_wins() -> None:
    assert stream(StopStringMatcher(("world", "lo w")), ["hello world"]) == ("hel", "lo w")
    assert stream(StopStringMatcher(("aab", "b")), ["aab"]) == ("", "aab")  # ends together: the longer
    assert stream(StopStringMatcher((" aa", "a")), [" aa"]) == (" ", "a")   # 'a' is produced before ' aa'


alphabet = st.sampled_from("ab\n ")


@given(text=st.text(alphabet, max_size=40), stops=st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_streamed_output_equals_text_up_to_first_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    emitted, matched = stream(StopStringMatcher(tuple(stops)), chunks)
    ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not ends:
        assert (emitted, matched) == (text, None)
        return
    end, _, stop = min(ends)
    assert (emitted, matched) == (text[:end - len(stop)], stop)
