"""Properties of the readers of the daemon's own state files, whatever a power cut, a full disk or a
stray editor left in them: the telemetry buffer (JSON lines), the quarantine store (one JSON object)
and the configuration layers (TOML). Damage reads as empty or partial, with a warning, or as our typed
ConfigError; never as a crash at start.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.errors import ConfigError, PermissionDeniedError
from agent.services.quarantine import MAX_ENTRIES, QuarantineStore
from agent.services.telemetry_buffer import Buffered, TelemetryBuffer
from agent.settings import load_config, read_toml
from tests.fuzz.payloads import BAD_UTF8
from tests.property.conftest import bounded


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def _fresh(scratch: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=name, dir=scratch))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
DAMAGE = (b"\n", b"\x00" * 16, b"[" * 100_000, b'{"ts": 1e400, "topic": 1, "payload": []}', b'{"ts": NaN}',
          b'{"ts": 1' + b"0" * 400 + b', "topic": "t", "payload": "p"}',
          b'{"ts": 5, "topic": "t", "payload": "\\ud800"}', *BAD_UTF8)

# -- telemetry buffer --------------------------------------------------------------------------------

records = st.lists(
    st.builds(Buffered, ts=st.floats(min_value=1e9, max_value=2e9), topic=st.text(min_size=1, max_size=20),
              payload=json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode())),
    min_size=1, max_size=8,
)


def _buffer(directory: Path) -> TelemetryBuffer:
    return TelemetryBuffer(directory, max_bytes=1 << 20, max_age_s=1e10)


@given(records, st.data())
def test_a_truncated_buffer_reads_as_the_records_before_the_cut(scratch: Path, kept: list[Buffered],
                                                                 data: st.DataObject) -> None:
    """Cut anywhere (a power cut mid-append): the records wholly before the cut come back in order, the
    torn one is skipped with a warning, and the next append is readable after them."""
    buffer = _buffer(_fresh(scratch, "cut"))
    for record in kept:
        buffer.append(record.topic, record.payload, record.ts)
    raw = buffer.path.read_bytes()
    cut = data.draw(st.integers(min_value=0, max_value=len(raw)))
    buffer.path.write_bytes(raw[:cut])
    whole = raw[:cut].count(b"\n")
    with capture_logs() as logs:
        got = bounded(lambda: buffer.pending(now=2e9))
    assert isinstance(got, list)
    assert got[:whole] == kept[:whole]
    assert len(got) in (whole, whole + 1)  # the last line may be complete but for its newline
    torn = cut and raw[cut - 1:cut] != b"\n" and len(got) == whole
    assert any(e["event"] == "telemetry_buffer_lines_skipped" for e in logs) == bool(torn)
    buffer.append("after/crash", b'{"ok": true}', 2e9)
    after = buffer.pending(now=2e9)
    assert after[-1] == Buffered(2e9, "after/crash", b'{"ok": true}')
    assert after[:whole] == kept[:whole]


@given(records, st.randoms(use_true_random=False), st.sampled_from(["flip", "insert", "replace"]),
       st.sampled_from(DAMAGE))
def test_a_damaged_buffer_never_fails_to_read_or_drain(scratch: Path, kept: list[Buffered], rng: random.Random,
                                                       how: str, damage: bytes) -> None:
    """Bit flips, garbage lines (deep nesting, NaN, invalid UTF-8, surrogates) or a file of random bytes:
    pending() and drain() return what is readable, never raise; appending still works."""
    buffer = _buffer(_fresh(scratch, "damage"))
    for record in kept:
        buffer.append(record.topic, record.payload, record.ts)
    raw = bytearray(buffer.path.read_bytes())
    if how == "flip":
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif how == "insert":
        at = rng.choice([0, len(raw), *(i + 1 for i, b in enumerate(raw) if b == 0x0A)])
        raw[at:at] = damage + b"\n"
    else:
        raw = bytearray(rng.randbytes(rng.randrange(1, 600)))
    buffer.path.write_bytes(bytes(raw))
    got = bounded(lambda: buffer.pending(now=2e9))
    assert isinstance(got, list)
    assert len(got) <= len(kept) + 1
    sent: list[tuple[str, bytes]] = []
    assert bounded(lambda: buffer.drain(lambda t, p: sent.append((t, p)), now=2e9)) == len(got)
    buffer.append("after", b"{}", 2e9)
    assert buffer.pending(now=2e9) == [Buffered(2e9, "after", b"{}")]


# -- quarantine store --------------------------------------------------------------------------------

entries = st.dictionaries(
    st.text(max_size=70),
    st.fixed_dictionaries({}, optional={"attempts": json_values | st.integers(), "topic": json_values,
                                        "bytes": json_values, "at": json_values}) | json_values,
    max_size=MAX_ENTRIES + 5,
)
SPECIAL = (b"", b"{", b"[]", b"null", b"[" * 100_000, b'{"k": {"attempts": Infinity}}', b'{"k": {"attempts": 1e400}}',
           b'{"k": {"attempts": NaN}}', b'{"k": {"attempts": 1, "bytes": -Infinity}}', b'{"k": {"attempts": "7"}}',
           b'{"k": {"attempts": 1, "at": "soon"}}', b'{"k": {"attempts": 1' + b"0" * 5000 + b"}}", *BAD_UTF8)


@given(entries.map(lambda e: json.dumps(e).encode()) | st.binary(max_size=300) | st.sampled_from(SPECIAL))
@example(b'{"k": {"attempts": Infinity}}')
@example(b'{"k": {"attempts": 2, "bytes": 1e400}}')
def test_a_damaged_quarantine_file_loads_as_what_is_readable(scratch: Path, raw: bytes) -> None:
    """Any file content: the store opens (empty and a warning when damaged), holds at most MAX_ENTRIES
    integer counts, and charging then writes a file that reads back."""
    path = _fresh(scratch, "q") / "quarantine.json"
    path.write_bytes(raw)
    with capture_logs():
        store = bounded(lambda: QuarantineStore(path))
    assert isinstance(store, QuarantineStore), store
    assert len(store) <= MAX_ENTRIES
    for key in list(store._entries):
        assert isinstance(store.attempts(key), int)
    assert store.charge("fresh-key", topic="t", size=1) == 1 + 0
    assert QuarantineStore(path).attempts("fresh-key") == 1


# -- configuration (TOML) ------------------------------------------------------------------------------

toml_scalars = st.sampled_from(['1', '"x"', "true", "1.5", "inf", "nan", "[]", "{}", '"\\ud800"', "1979-05-27",
                                '"""a"""', "'lit'", "[1, [2]]", "{a = 1}", "-0", "0x1f"])
toml_keys = st.sampled_from(["device_id", "groups", "mqtt.port", "mqtt.host", "inference.max_queue", "log.level",
                             "inference", "model.n_ctx", "fleet.state_dir", "x", "a.b.c", '"q.k"', "mqtt"])
toml_lines = st.lists(
    st.one_of(st.tuples(toml_keys, toml_scalars).map(lambda kv: f"{kv[0]} = {kv[1]}"),
              st.sampled_from(["[mqtt]", "[inference]", "[[groups]]", "[", "= 1", "# c", "[log]", "a = ", ""])),
    max_size=8,
).map("\n".join)


@given(toml_lines.map(str.encode) | st.binary(max_size=200)
       | st.sampled_from([b"a = " + b"[" * 5000, b"a = " + b"{b = " * 3000, b"\xff = 1", b"a = \"\\ud800\""]))
@example(b"a = " + b"[" * 5000)
def test_any_config_file_reads_as_toml_or_a_config_error(scratch: Path, raw: bytes) -> None:
    """Any bytes in a config file: TOML data or ConfigError (syntax, not UTF-8, nested too deep); and the
    whole load with it as the fleet override layer ends in Settings or ConfigError, never anything else."""
    directory = _fresh(scratch, "toml")
    overrides = directory / "state" / "config-overrides.toml"
    overrides.parent.mkdir()
    overrides.write_bytes(raw)
    got = bounded(lambda: read_toml(overrides))
    assert isinstance(got, dict | ConfigError), got
    config = directory / "agent.toml"
    config.write_text(f'device_id = "dev1"\n[fleet]\nstate_dir = "{overrides.parent}"\n')
    loaded: Any = bounded(lambda: load_config(config, required=True, environ={}, strict_overrides=True))
    assert not isinstance(loaded, PermissionDeniedError)
    assert isinstance(loaded, ConfigError) or loaded.settings.device_id
    # The same bytes as the provisioned file itself.
    config.write_bytes(raw)
    loaded = bounded(lambda: load_config(config, required=True, environ={}))
    assert isinstance(loaded, ConfigError) or loaded.settings is not None


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda d: d[:12].decode("latin-1"))
def test_each_kind_of_damaged_line_is_skipped_not_fatal(scratch: Path, damage: bytes) -> None:
    """Regression: a 100,000-deep line (RecursionError) or a 400-digit timestamp (OverflowError) made every
    read, drain and compaction of the buffer fail; such a line is now skipped like any torn one."""
    buffer = _buffer(_fresh(scratch, "line"))
    buffer.append("before", b"{}", 1e9)
    with buffer.path.open("ab") as f:
        f.write(damage + b"\n")
    buffer.append("after", b"{}", 1e9)
    topics = [r.topic for r in buffer.pending(now=2e9)]
    assert topics[0] == "before"
    assert topics[-1] == "after"
    assert len(topics) <= 3  # the damaged line itself, if it still reads as a record
