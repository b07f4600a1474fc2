"""Stop sequences in streamed text: never emitted, never split wrongly."""

from __future__ import annotations

from agent.engine.stops import StopScanner


def stream(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    s = StopScanner(stops)
    out = "".join(s.feed(p) for p in pieces)
    if not s.stopped:
        out += s.flush()
    assert out == s.text
    return out, s.stopped


def test_no_stops_passes_text_through() -> None:
    """Without stop sequences every piece is emitted as it comes."""
    assert stream((), ["a", "b"]) == ("ab", False)


def test_stop_split_across_pieces_is_not_emitted() -> None:
    """A stop sequence arriving in two pieces cuts the text before it."""
    assert stream(("END",), ["hello E", "N", "D more"]) == ("hello ", True)


def test_held_back_prefix_is_released_when_it_is_not_a_stop() -> None:
    """Text that only looked like the start of a stop sequence is emitted later."""
    s = StopScanner(("END",))
    assert s.feed("abc E") == "abc "
    assert s.feed("x") == "Ex"


def test_earliest_of_several_stops_wins() -> None:
    """With several stop sequences the first occurrence in the text cuts it."""
    assert stream(("\n\n", "User:"), ["Sure. User: hi\n\nbye"]) == ("Sure. ", True)


def test_held_back_text_is_flushed_at_the_end() -> None:
    """A trailing partial stop sequence is real text when generation ends."""
    assert stream(("STOP",), ["go ST"]) == ("go ST", False)
