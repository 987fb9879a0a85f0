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


def test_earliest_of_several_stop_strings_wins() -> None:
    assert stream(StopStringMatcher(("world", "lo w")), ["hello world"]) == ("hel", "lo w")


alphabet = st.sampled_from("ab\n ")


@given(text=st.text(alphabet, max_size=40), stops=st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_streamed_output_equals_text_up_to_first_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    emitted, matched = stream(StopStringMatcher(tuple(stops)), chunks)
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        assert (emitted, matched) == (text, None)
        return
    first = min(index for index, _ in hits)
    assert emitted == text[:first]
    assert matched is not None and text.startswith(matched, first)
