"""Admission policy: deadlines, duplicate suppression and the bounded FIFO."""

from __future__ import annotations

from agent.services.queueing import BoundedQueue, RecentKeys, deadline_for


def test_deadline_is_the_earliest_of_expiry_and_deadline_ms() -> None:
    """Both limits apply; the tighter one wins; none means no deadline."""
    assert deadline_for(100.0, None, None) is None
    assert deadline_for(100.0, 5, None) == 105.0
    assert deadline_for(100.0, None, 250) == 100.25
    assert deadline_for(100.0, 5, 9000) == 105.0


def test_recent_keys_flags_a_repeat_within_the_window_only() -> None:
    """A key seen again inside the window is a duplicate; after the window it is new again."""
    recent = RecentKeys(window_s=10)
    assert recent.check_and_add("a", 0.0) is False
    assert recent.check_and_add("a", 5.0) is True
    assert recent.check_and_add("a", 20.0) is False


def test_recent_keys_is_bounded() -> None:
    """The oldest entries go first when the table is full."""
    recent = RecentKeys(window_s=1000, max_entries=2)
    for key in "abc":
        recent.check_and_add(key, 0.0)
    assert recent.check_and_add("a", 1.0) is False
    assert recent.check_and_add("c", 1.0) is True


def test_bounded_queue_refuses_when_full_and_keeps_fifo_order() -> None:
    """offer() fails at capacity; take() returns items in arrival order."""
    q: BoundedQueue[int] = BoundedQueue(capacity=2)
    assert q.offer(1) and q.offer(2)
    assert not q.offer(3)
    assert q.take(0) == 1
    assert q.take(0) == 2
    assert q.take(0) is None


def test_remove_first_and_close() -> None:
    """A queued item can be removed by predicate; close() hands back the rest and refuses more."""
    q: BoundedQueue[int] = BoundedQueue(capacity=5)
    for i in range(4):
        q.offer(i)
    assert q.remove_first(lambda x: x == 2) == 2
    assert q.close() == [0, 1, 3]
    assert not q.offer(9)
    assert q.take(0.01) is None


def test_remove_all_takes_every_match_and_keeps_the_order_of_the_rest() -> None:
    """remove_all hands back the matching items in queue order; the others stay queued in order."""
    q: BoundedQueue[int] = BoundedQueue(capacity=6)
    for i in range(6):
        q.offer(i)
    assert q.remove_all(lambda x: x % 2 == 0) == [0, 2, 4]
    assert q.remove_all(lambda x: x > 10) == []
    assert [q.take(0) for _ in range(3)] == [1, 3, 5]
