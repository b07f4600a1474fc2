"""Pure pieces of request admission: the bounded FIFO, deadlines and duplicate suppression.

None of this touches MQTT or llama.cpp, so the policies are unit-tested directly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


def deadline_for(arrived: float, message_expiry_s: int | None, deadline_ms: int | None) -> float | None:
    """The earliest of the MQTT 5 message expiry and the payload's ``deadline_ms``, on arrival's clock."""
    candidates = []
    if message_expiry_s is not None:
        candidates.append(arrived + message_expiry_s)
    if deadline_ms is not None:
        candidates.append(arrived + deadline_ms / 1000.0)
    return min(candidates) if candidates else None


class RecentKeys:
    """Remembers keys for ``window_s`` so a redelivered request is served once."""

    def __init__(self, window_s: float, max_entries: int = 10_000) -> None:
        self._window = window_s
        self._max = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check_and_add(self, key: str, now: float) -> bool:
        """True if ``key`` was already seen within the window (and so is a duplicate)."""
        self._expire(now)
        if key in self._seen:
            return True
        self._seen[key] = now
        if len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return False

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)

    def _expire(self, now: float) -> None:
        while self._seen:
            key, at = next(iter(self._seen.items()))
            if now - at <= self._window:
                break
            del self._seen[key]


@dataclass
class BoundedQueue(Generic[T]):
    """FIFO with a hard bound: a full queue refuses at once instead of growing."""

    capacity: int
    _items: deque[T] = field(default_factory=deque)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _closed: bool = False

    def offer(self, item: T) -> bool:
        with self._cond:
            if self._closed or len(self._items) >= self.capacity:
                return False
            self._items.append(item)
            self._cond.notify()
            return True

    def take(self, timeout: float) -> T | None:
        """Next item, or None after ``timeout`` or once closed and empty."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def wake(self) -> None:
        """Wake a waiting ``take`` (it returns None) so the consumer can look at other work."""
        with self._cond:
            self._cond.notify_all()

    def remove_first(self, match: Callable[[T], bool]) -> T | None:
        with self._cond:
            for item in self._items:
                if match(item):
                    self._items.remove(item)
                    return item
        return None

    def remove_all(self, match: Callable[[T], bool]) -> list[T]:
        """Take every waiting item that matches (in queue order); the rest keep their places."""
        with self._cond:
            taken = [item for item in self._items if match(item)]
            if taken:
                self._items = deque(item for item in self._items if not match(item))
            return taken

    def close(self) -> list[T]:
        """Stop accepting; return what was still waiting (the caller answers them)."""
        with self._cond:
            self._closed = True
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
