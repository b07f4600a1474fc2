"""sd_notify client: environment parsing, and messages as a real AF_UNIX datagram socket receives them."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.sdnotify import Notifier
from tests.support.sd_socket import NotifyReceiver


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path):
    """A listening socket, once as a file path and once as an abstract '@' name."""
    with NotifyReceiver(tmp_path if request.param == "path" else None) as r:
        yield r


class TestFromEnviron:
    def test_no_notify_socket_means_disabled(self) -> None:
        """Without NOTIFY_SOCKET (not started by systemd) the notifier is disabled."""
        notifier = Notifier.from_environ({})
        assert not notifier.enabled
        assert notifier.watchdog_interval_s() is None

    def test_every_call_is_a_noop_when_disabled(self) -> None:
        """A disabled notifier sends nothing and reports that nothing was sent."""
        notifier = Notifier.from_environ({})
        assert [notifier.ready("x"), notifier.status("x"), notifier.watchdog(), notifier.stopping()] == [False] * 4

    def test_relative_socket_name_is_ignored(self) -> None:
        """Only absolute paths and '@' names are valid NOTIFY_SOCKET values (as in sd_notify(3))."""
        assert not Notifier.from_environ({"NOTIFY_SOCKET": "relative.sock"}).enabled

    def test_watchdog_interval_is_half_the_timeout(self) -> None:
        """WATCHDOG_USEC=10s gives a 5 s ping interval."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "10000000"}, pid=42)
        assert notifier.watchdog_interval_s() == 5.0

    def test_watchdog_for_another_pid_is_not_ours(self) -> None:
        """WATCHDOG_PID naming another process (an inherited environment) disables the watchdog here."""
        env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "41"}
        assert Notifier.from_environ(env, pid=42).watchdog_interval_s() is None
        assert Notifier.from_environ(env, pid=41).watchdog_interval_s() == 5.0

    @pytest.mark.parametrize("raw", ["", "0", "-5", "soon"])
    def test_unusable_watchdog_usec_means_no_watchdog(self, raw: str) -> None:
        """Empty, zero, negative or non-numeric WATCHDOG_USEC turns the watchdog off instead of failing."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": raw})
        assert notifier.watchdog_interval_s() is None


class TestMessagesOnARealSocket:
    def test_lifecycle_arrives_in_order(self, receiver: NotifyReceiver) -> None:
        """READY, WATCHDOG and STOPPING arrive as separate datagrams in the order they were sent."""
        notifier = Notifier.from_environ(receiver.environ(watchdog_usec=2_000_000))
        assert notifier.status("loading model")
        assert notifier.ready("serving qwen2.5-0.5b")
        assert notifier.watchdog()
        assert notifier.stopping()
        receiver.wait_for("STOPPING=1", timeout=2)
        assert receiver.assignments() == [
            "STATUS=loading model",
            "READY=1",
            "STATUS=serving qwen2.5-0.5b",
            "WATCHDOG=1",
            "STOPPING=1",
        ]

    def test_ready_and_its_status_share_one_datagram(self, receiver: NotifyReceiver) -> None:
        """READY=1 with a reason is one message, so systemd shows the reason the moment it marks us ready."""
        Notifier.from_environ(receiver.environ()).ready("serving, pull running")
        message = receiver.wait_for("READY=1", timeout=2)
        assert message.fields == {"READY": "1", "STATUS": "serving, pull running"}

    def test_status_newlines_are_flattened(self, receiver: NotifyReceiver) -> None:
        """A multi-line status cannot inject extra assignments such as READY=1."""
        Notifier.from_environ(receiver.environ()).status("bad\nREADY=1")
        message = receiver.wait_for("STATUS=", timeout=2)
        assert message.raw == "STATUS=bad READY=1"
        assert receiver.count("READY=1") == 0

    def test_reloading_and_extend_timeout(self, receiver: NotifyReceiver) -> None:
        """RELOADING=1 and EXTEND_TIMEOUT_USEC (microseconds) are sent as systemd expects them."""
        notifier = Notifier.from_environ(receiver.environ())
        notifier.reloading("swapping model")
        notifier.extend_timeout(90)
        receiver.wait_for("EXTEND_TIMEOUT_USEC=", timeout=2)
        assert receiver.assignments() == ["RELOADING=1", "STATUS=swapping model", "EXTEND_TIMEOUT_USEC=90000000"]


class TestNeverRaises:
    def test_missing_socket_returns_false_and_logs_at_debug(self, tmp_path: Path) -> None:
        """A socket that went away (systemd stopping) drops the message with a debug log, no exception."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
        with capture_logs() as logs:
            assert notifier.watchdog() is False
        assert [(e["event"], e["log_level"]) for e in logs] == [("sd_notify_failed", "debug")]

    def test_unbound_abstract_name_returns_false(self) -> None:
        """An abstract name nobody listens on is refused by the kernel and swallowed."""
        assert Notifier.from_environ({"NOTIFY_SOCKET": "@edge-agent-test-nobody-here"}).ready() is False


def test_barrier_returns_once_the_listener_has_read_everything(tmp_path: Path) -> None:
    """BARRIER=1 carries a pipe end; the call returns True when the listener has consumed (closed) it."""
    with NotifyReceiver(tmp_path) as receiver:
        notifier = Notifier.from_environ(receiver.environ())
        assert notifier.failed("failed: cannot read /etc/edge-agent/agent.toml", 13)
        assert notifier.barrier(timeout_s=5)
        receiver.wait_for("BARRIER=1", timeout=5)
        assert receiver.assignments()[:2] == ["STATUS=failed: cannot read /etc/edge-agent/agent.toml", "ERRNO=13"]


def test_barrier_without_systemd_is_a_noop() -> None:
    """Outside systemd there is nothing to wait for."""
    assert Notifier.from_environ({}).barrier() is False
