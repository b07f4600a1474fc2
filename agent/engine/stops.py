"""Stop-sequence handling for streamed text, kept pure so it can be tested without a model.

Text that might be the start of a stop sequence is held back until the next token shows whether
it is; text after a matched stop sequence is never emitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StopScanner:
    stops: tuple[str, ...]
    text: str = ""
    emitted: int = 0
    stopped: bool = False
    _max_stop: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._max_stop = max((len(s) for s in self.stops), default=0)

    def feed(self, piece: str) -> str:
        """Add generated text; return the part that is now safe to emit ('' when held back)."""
        if self.stopped:
            return ""
        self.text += piece
        if not self.stops:
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        search_from = max(0, self.emitted - self._max_stop + 1)
        cut = -1
        for stop in self.stops:
            idx = self.text.find(stop, search_from)
            if idx != -1 and (cut == -1 or idx < cut):
                cut = idx
        if cut != -1:
            self.stopped = True
            self.text = self.text[:cut]
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        safe_end = len(self.text) - self._held_back()
        out = self.text[self.emitted : safe_end] if safe_end > self.emitted else ""
        self.emitted = max(self.emitted, safe_end)
        return out

    def flush(self) -> str:
        """End of generation: whatever was held back is real text after all."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:k]):
                    best = k
                    break
        return best
