"""Transport security on real Mosquitto TLS listeners, with real certificates, against the real daemon.

Every broker here runs on a free loopback port with a certificate made by tests/support/pki.py. Each
misconfiguration must give one specific reason at start (log event ``mqtt_tls_failed`` and the unit's
STATUS=, or for the cloud link a ``cloud_tls_failed`` event while the device keeps serving), keep
retrying, and never open a plaintext MQTT session: the brokers log every client that completes an
MQTT CONNECT (``log_type notice``), and the daemon's client id must never appear there.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.transport.tls import client_context, probe_client_certificate
from tests.support.broker import Broker, ListenerTls
from tests.support.daemon import Client, DaemonProcess, write_config
from tests.support.pki import Issued, Pki, days_ago
from tests.support.sd_socket import NotifyReceiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": 8}
DAEMON_ID = "edge-agent-dev1"
RELAY_ID = "edge-agent-dev1-relay"


@dataclass(frozen=True)
class Certs:
    pki: Pki  # the fleet's CA: the daemon trusts it, the brokers check client certificates with it
    other: Pki  # a CA nobody here trusts
    good: Issued  # server certificate for 127.0.0.1 and localhost
    expired: Issued
    wrong_name: Issued  # valid, but only for broker.example
    foreign: Issued  # valid for 127.0.0.1, signed by the other CA
    dev1: Issued  # the device's client certificate
    foreign_client: Issued  # a client certificate from the other CA
    tester: Issued  # the test client's certificate


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    other = Pki(tmp_path_factory.mktemp("other-pki"), name="Someone else's CA")
    return Certs(
        pki=pki,
        other=other,
        good=pki.server("broker"),
        expired=pki.server("expired", not_before=days_ago(30), not_after=days_ago(1)),
        wrong_name=pki.server("wrong-name", hosts=("broker.example",)),
        foreign=other.server("foreign"),
        dev1=pki.client("dev1"),
        foreign_client=other.client("dev1-foreign"),
        tester=pki.client("tester"),
    )


def listener(certs: Certs, server: Issued | None, *, mtls: bool = False, client_ca: Path | None = None
             ) -> ListenerTls | None:
    if server is None:
        return None  # a plain MQTT listener
    return ListenerTls(cert=server.cert, key=server.key, ca=client_ca or certs.pki.ca_cert, require_certificate=mtls)


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Factory: a Mosquitto with the given listener TLS (None = plaintext) that logs every MQTT CONNECT."""
    started: list[Broker] = []

    def _start(name: str, tls: ListenerTls | None) -> Broker:
        broker = Broker(tmp_path / name, tls=tls, extra=("log_type notice",)).start()
        started.append(broker)
        return broker

    yield _start
    for broker in started:
        broker.stop()


def broker_log(broker: Broker) -> str:
    return (broker.workdir / "mosquitto.log").read_text(errors="replace")


def mqtt_sessions(broker: Broker, client_id: str) -> int:
    """How many MQTT sessions ``client_id`` opened on ``broker`` (Mosquitto logs each completed CONNECT)."""
    return sum(1 for line in broker_log(broker).splitlines()
               if "New client connected" in line and f" as {client_id} " in line)


def tls_client_context(certs: Certs, client: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.pki.ca_cert))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


def start_daemon(tmp_path: Path, model: Path, receiver: NotifyReceiver, *, mqtt: dict[str, Any],
                 credentials: Path | None = None, **sections: dict[str, Any]) -> DaemonProcess:
    config = write_config(tmp_path / "dev1.toml", port=mqtt.pop("port"), model_file=model, mqtt=mqtt, **sections)
    env = receiver.environ()
    if credentials is not None:
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
    return DaemonProcess(config=config, workdir=tmp_path, env=env).start()


def wait_status(receiver: NotifyReceiver, needle: str, timeout: float) -> str:
    """The first STATUS= line containing ``needle``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in receiver.messages:
            status = message.fields.get("STATUS", "")
            if needle in status:
                return status
        time.sleep(0.05)
    raise AssertionError(f"no STATUS= with {needle!r}; got {[m.fields.get('STATUS') for m in receiver.messages]}")


def stop(daemon: DaemonProcess) -> int:
    daemon.signal(signal.SIGTERM)
    return daemon.wait(30)


def ask(client: Client, prefix: str = "edge", device: str = "dev1") -> dict[str, Any]:
    return json.loads(client.collect(client.request(device, CHAT, prefix=prefix), timeout=60)[-1].payload)


# --- the good case ----------------------------------------------------------------------------------


def test_mtls_daemon_serves_a_request_from_a_tls_client(tmp_path, tiny_models, certs, brokers) -> None:
    """With mTLS (key as the systemd credential tls_key) the daemon connects, is READY, and answers over TLS."""
    broker = brokers("mtls", listener(certs, certs.good, mtls=True))
    creds = tmp_path / "credentials"
    creds.mkdir()
    shutil.copy(certs.dev1.key, creds / "tls_key")
    with NotifyReceiver() as receiver:
        daemon = start_daemon(tmp_path, tiny_models["Q8_0"], receiver, credentials=creds, mqtt={
            "port": broker.port, "tls": True, "ca_file": str(certs.pki.ca_cert), "cert_file": str(certs.dev1.cert)})
        try:
            receiver.wait_for("READY=1", 60)
            client = Client(broker.port, tls=tls_client_context(certs, certs.tester))
            try:
                body = ask(client)
            finally:
                client.close()
            assert body["done"] is True
            assert body["usage"]["completion_tokens"] == 8
            assert body["served_by"] == "dev1"
            assert not [e for e in daemon.events() if e.get("event") == "mqtt_tls_failed"]
            assert stop(daemon) == 0
        finally:
            daemon.kill()
    assert mqtt_sessions(broker, DAEMON_ID) == 1  # what the negative tests look for does show up when it happens


# --- the local broker: each misconfiguration, named -------------------------------------------------


@dataclass(frozen=True)
class Case:
    server: str | None  # attribute of Certs; None = a plain listener
    reason: str
    mtls: bool = False
    host: str = "127.0.0.1"
    client_cert: str | None = "dev1"  # attribute of Certs the daemon presents; None = no client certificate


PRIMARY_CASES = {
    "wrong_ca": Case("foreign", "unknown_ca"),
    "expired": Case("expired", "certificate_expired"),
    "hostname_ip": Case("wrong_name", "hostname_mismatch"),
    "hostname_localhost": Case("wrong_name", "hostname_mismatch", host="localhost"),
    "plain_listener": Case(None, "not_tls"),
    "no_client_cert": Case("good", "client_cert_rejected", mtls=True, client_cert=None),
    "client_cert_other_ca": Case("good", "client_cert_rejected", mtls=True, client_cert="foreign_client"),
}


@pytest.mark.parametrize("case", list(PRIMARY_CASES.values()), ids=list(PRIMARY_CASES))
def test_local_broker_tls_failure_is_named_retried_and_never_plaintext(tmp_path, tiny_models, certs, brokers,
                                                                       case: Case) -> None:
    """A TLS misconfiguration logs mqtt_tls_failed with its reason and a fix, shows in STATUS=, is retried, and
    the daemon never opens an MQTT session in plaintext (nor READY=1); SIGTERM still stops it cleanly."""
    server = getattr(certs, case.server) if case.server else None
    broker = brokers("local", listener(certs, server, mtls=case.mtls))
    mqtt: dict[str, Any] = {"port": broker.port, "host": case.host, "tls": True, "ca_file": str(certs.pki.ca_cert)}
    if case.client_cert:
        issued = getattr(certs, case.client_cert)
        mqtt |= {"cert_file": str(issued.cert), "key_file": str(issued.key)}
    with NotifyReceiver() as receiver:
        daemon = start_daemon(tmp_path, tiny_models["Q8_0"], receiver, mqtt=mqtt)
        try:
            failed = daemon.wait_event("mqtt_tls_failed", 30, link="primary", reason=case.reason)
            assert failed["level"] == "error"
            assert failed["broker"] == f"{case.host}:{broker.port}"
            assert failed["hint"]
            assert failed["detail"]
            status = wait_status(receiver, f"failed: {case.reason}", 60)
            assert status.startswith(f"TLS to broker {case.host}:{broker.port} failed: {case.reason} (")
            assert "never without TLS" in status
            daemon.wait_event("mqtt_tls_failed", 30, reason=case.reason, repeat=True)  # retried, logged once
            assert not [e for e in daemon.events() if e.get("event") == "mqtt_connected"]
            assert not receiver.count("READY=1")
            assert stop(daemon) == 0
        finally:
            daemon.kill()
    errors = [e for e in daemon.events() if e.get("event") == "mqtt_tls_failed" and e.get("level") == "error"]
    assert [e["reason"] for e in errors] == [case.reason]  # one error line, however many attempts
    assert mqtt_sessions(broker, DAEMON_ID) == 0  # attempts reached the broker (above); none became a session


def test_daemon_connects_once_the_broker_certificate_is_renewed(tmp_path, tiny_models, certs, brokers) -> None:
    """Certificates get rotated: after 'certificate_expired' the daemon keeps trying and serves once it is fixed."""
    broker = brokers("rotating", listener(certs, certs.expired))
    with NotifyReceiver() as receiver:
        daemon = start_daemon(tmp_path, tiny_models["Q8_0"], receiver, mqtt={
            "port": broker.port, "tls": True, "ca_file": str(certs.pki.ca_cert)})
        try:
            daemon.wait_event("mqtt_tls_failed", 30, reason="certificate_expired")
            wait_status(receiver, "failed: certificate_expired", 60)
            broker.tls = listener(certs, certs.good)
            broker.restart()
            daemon.wait_event("mqtt_connected", 30, link="primary")
            receiver.wait_for("READY=1", 30)
            client = Client(broker.port, tls=tls_client_context(certs))
            try:
                assert ask(client)["served_by"] == "dev1"
            finally:
                client.close()
            assert stop(daemon) == 0
        finally:
            daemon.kill()


def test_unusable_ca_file_stops_the_start_with_exit_78(tmp_path, tiny_models, certs) -> None:
    """A CA file that is not there is this device's configuration error: exit 78 (not restarted), one line."""
    with NotifyReceiver() as receiver:
        daemon = start_daemon(tmp_path, tiny_models["Q8_0"], receiver, mqtt={
            "port": 8883, "tls": True, "ca_file": str(tmp_path / "nowhere.crt")})
        try:
            assert daemon.wait(30) == 78
        finally:
            daemon.kill()
    assert f"edge-agent: error: mqtt.ca_file: {tmp_path / 'nowhere.crt'} does not exist" in daemon.log_text()


def test_probe_hears_the_brokers_verdict_on_the_client_certificate(tmp_path, certs, brokers) -> None:
    """Sending nothing after the handshake, the probe reads a TLS 1.3 mTLS refusal that a busy client can miss."""
    broker = brokers("mtls", listener(certs, certs.good, mtls=True))
    without = probe_client_certificate("127.0.0.1", broker.port, client_context(certs.pki.ca_cert, None, None), 2.0)
    assert without is not None
    assert without.reason == "client_cert_rejected"
    foreign = client_context(certs.pki.ca_cert, certs.foreign_client.cert, certs.foreign_client.key)
    other = probe_client_certificate("127.0.0.1", broker.port, foreign, 2.0)
    assert other is not None
    assert other.reason == "client_cert_rejected"
    good = client_context(certs.pki.ca_cert, certs.dev1.cert, certs.dev1.key)
    assert probe_client_certificate("127.0.0.1", broker.port, good, 0.5) is None


# --- the cloud link ---------------------------------------------------------------------------------


CLOUD_PHASES: list[tuple[str, str | None, bool, str | None]] = [
    # (reason, server certificate, mTLS, CA the broker checks client certificates with: None = ours)
    ("certificate_expired", "expired", False, None),
    ("unknown_ca", "foreign", False, None),
    ("hostname_mismatch", "wrong_name", False, None),
    ("client_cert_rejected", "good", True, "other"),
    ("not_tls", None, False, None),
]


def test_cloud_link_tls_failures_are_reported_while_the_device_serves_locally(tmp_path, tiny_models, certs,
                                                                              brokers) -> None:
    """Each cloud-broker TLS failure is one cloud_tls_failed event (and log line) with its reason; the device
    serves local requests throughout, never opens a plaintext cloud session, and connects once it is fixed."""
    local = Broker(tmp_path / "local").start()
    first = CLOUD_PHASES[0]
    cloud = brokers("cloud", listener(certs, getattr(certs, first[1])))
    watcher = Client(local.port)
    try:
        watcher.subscribe("edge/dev1/events")
        with NotifyReceiver() as receiver:
            daemon = start_daemon(
                tmp_path, tiny_models["Q8_0"], receiver, mqtt={"port": local.port},
                cloud={"enabled": True, "host": "127.0.0.1", "port": cloud.port, "tls": True,
                       "ca_file": str(certs.pki.ca_cert), "cert_file": str(certs.dev1.cert),
                       "key_file": str(certs.dev1.key), "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            )
            try:
                daemon.wait_event("agent_started", 60)
                for reason, server, mtls, client_ca in CLOUD_PHASES:
                    if (reason, server, mtls, client_ca) != first:
                        ca = certs.other.ca_cert if client_ca == "other" else None
                        cloud.tls = listener(certs, getattr(certs, server) if server else None, mtls=mtls,
                                             client_ca=ca)
                        cloud.restart()
                    daemon.wait_event("mqtt_tls_failed", 30, link="cloud", reason=reason)
                    event = wait_for_event(watcher, "cloud_tls_failed", reason, 30)
                    assert event["device_id"] == "dev1"
                    assert ask(watcher)["served_by"] == "dev1"  # the edge keeps serving locally
                assert mqtt_sessions(cloud, RELAY_ID) == 0
                cloud.tls = listener(certs, certs.good, mtls=True)
                cloud.restart()
                daemon.wait_event("relay_connected", 30)
                assert ask(watcher)["served_by"] == "dev1"
                assert receiver.count("READY=1") == 1
                assert stop(daemon) == 0
            finally:
                daemon.kill()
    finally:
        watcher.close()
        local.stop()
    errors = [e["reason"] for e in daemon.events()
              if e.get("event") == "mqtt_tls_failed" and e.get("level") == "error" and e.get("link") == "cloud"]
    assert errors == [phase[0] for phase in CLOUD_PHASES]  # one error line per new reason
    assert mqtt_sessions(cloud, RELAY_ID) == 1


def wait_for_event(client: Client, kind: str, reason: str, timeout: float) -> dict[str, Any]:
    """The next event of ``kind`` with ``reason`` among the client's messages (other events are dropped)."""
    deadline = time.monotonic() + timeout
    seen, others = [], []
    try:
        while time.monotonic() < deadline:
            try:
                message = client.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not message.topic.endswith("/events"):
                others.append(message)  # not ours: handed back for collect()
                continue
            data = json.loads(message.payload)
            seen.append((data.get("kind"), data.get("reason")))
            if data.get("kind") == kind and data.get("reason") == reason:
                return data
    finally:
        for message in others:
            client.messages.put(message)
    raise AssertionError(f"no {kind} event with reason {reason}; saw {seen}")
