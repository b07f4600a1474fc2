"""Properties of the GGUF header parser on truncated and mutated headers of a real tiny model file.

A header read from a Hub Range request or a half-downloaded file may end anywhere, and a corrupt or
hostile one may claim 2^63 keys, an array of 2^40 strings or a 1 TB string. The parser must answer with
our typed errors (NeedMoreBytes: read more; GgufFormatError: not a file we can read; ModelFileError:
cannot read it), quickly, without allocating more than a small multiple of the bytes it was given.
"""

from __future__ import annotations

import random
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.catalog import gguf_header
from agent.catalog.gguf_header import GgufFormatError, GgufInfo, NeedMoreBytes, parse_header, read_local
from agent.errors import ModelFileError
from tests.property.conftest import bounded, peak_allocation
from tests.support.tiny_gguf import MIN_VOCAB_SIZE, write_tiny_llama

MEMORY_BOUND = 48 << 20
"""Peak Python allocation allowed for one parse of a header of ~20 KB (or a read of a ~100 KB file)."""


@pytest.fixture(scope="module")
def model() -> Iterator[tuple[Path, bytes, list[tuple[int, int]]]]:
    """A tiny real model file, its bytes, and the (offset, size) of every header field the parser reads."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_llama(Path(tmp) / "tiny.gguf", vocab_size=MIN_VOCAB_SIZE, n_embd=32, n_head=4,
                                n_head_kv=2, n_ff=32, n_layer=1)
        raw = path.read_bytes()
        fields: list[tuple[int, int]] = []
        take = gguf_header._Reader.take

        def recording(self: gguf_header._Reader, n: int) -> memoryview:
            fields.append((self.pos, n))
            return take(self, n)

        gguf_header._Reader.take = recording  # type: ignore[method-assign]
        try:
            info = parse_header(raw)
        finally:
            gguf_header._Reader.take = take  # type: ignore[method-assign]
        assert info.architecture == "llama"
        yield path, raw, [(at, n) for at, n in fields if n in (1, 2, 4, 8)]


@given(st.data())
def test_a_header_cut_anywhere_asks_for_more_bytes(model: tuple[Path, bytes, list[tuple[int, int]]],
                                                   data: st.DataObject) -> None:
    """Any prefix shorter than the header: NeedMoreBytes naming more than it got; any longer one: the
    same header as the whole file."""
    _, raw, _ = model
    full = parse_header(raw)
    cut = data.draw(st.integers(min_value=0, max_value=full.data_offset + 64))
    got = bounded(lambda: parse_header(raw[:cut]))
    if isinstance(got, NeedMoreBytes):
        assert got.needed > cut
    else:
        assert got == full


EXTREMES = (0, 1, 2, 3, 7, 8, 13, 0x7F, 0xFF, 0xFFFF, 0xFFFF_FFFF, 1 << 32, 1 << 40, (1 << 40) + 1, 1 << 62,
            (1 << 63) - 1, (1 << 64) - 1)


def _overwrite(raw: bytearray, at: int, size: int, value: int) -> None:
    raw[at:at + size] = (value % (1 << (8 * size))).to_bytes(size, "little")


@given(st.randoms(use_true_random=False), st.sampled_from(["field", "field", "flip", "bytes", "cut_field"]))
@example(random.Random(1), "field")
def test_a_mutated_header_is_parsed_or_refused_with_a_typed_error(
    model: tuple[Path, bytes, list[tuple[int, int]]], rng: random.Random, how: str
) -> None:
    """Counts, lengths, types and dims set to extremes, bit flips, random bytes: a GgufInfo, NeedMoreBytes or
    GgufFormatError, in bounded time and memory."""
    _, raw, fields = model
    header_end = parse_header(raw).data_offset
    buf = bytearray(raw[:header_end])
    for _ in range(rng.randint(1, 3)):
        if how in ("field", "cut_field"):
            at, size = rng.choice(fields)
            _overwrite(buf, at, size, rng.choice(EXTREMES) if rng.random() < 0.8 else rng.getrandbits(8 * size))
        elif how == "flip":
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        else:
            i = rng.randrange(len(buf))
            buf[i:i + 8] = rng.randbytes(8)
    if how == "cut_field":
        buf = buf[: rng.randrange(len(buf))]
    with peak_allocation(MEMORY_BOUND):
        got = bounded(lambda: parse_header(bytes(buf)))
    assert isinstance(got, GgufInfo | NeedMoreBytes | GgufFormatError), got


@given(st.randoms(use_true_random=False))
def test_a_mutated_file_is_read_or_refused_in_bounded_memory(
    model: tuple[Path, bytes, list[tuple[int, int]]], rng: random.Random
) -> None:
    """read_local on a file with a mutated header: GgufInfo, GgufFormatError or ModelFileError, never
    NeedMoreBytes, never a read sized by a corrupt count (a 2^43-byte read was a MemoryError)."""
    _, raw, fields = model
    buf = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        at, size = rng.choice(fields)
        _overwrite(buf, at, size, rng.choice(EXTREMES))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutated.gguf"
        path.write_bytes(bytes(buf[: rng.choice((len(buf), rng.randrange(1, len(buf))))]))
        with peak_allocation(MEMORY_BOUND):
            got = bounded(lambda: read_local(path, initial_bytes=rng.choice((64, 4096, 1 << 20))))
    assert isinstance(got, GgufInfo | GgufFormatError | ModelFileError), got


def _kv_header(values: bytes, n_kv: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + values


def _key(name: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name


ARRAY, UINT32, STRING, FLOAT32 = 9, 4, 8, 6


@pytest.mark.parametrize(
    ("case", "header"),
    [
        # An array of arrays of arrays...: 12 bytes a level, recursion without a bound.
        ("nested_arrays", _kv_header(_key(b"a") + struct.pack("<I", ARRAY) + struct.pack("<IQ", ARRAY, 1) * 5000)),
        # A scalar array claiming 2^40 items: the parser asks for 2^42 bytes; read_local must not read them.
        ("huge_array", _kv_header(_key(b"a") + struct.pack("<I", ARRAY) + struct.pack("<IQ", UINT32, 1 << 40))),
        ("huge_string", _kv_header(_key(b"a") + struct.pack("<IQ", STRING, 1 << 25) + b"x" * 16)),
        ("many_keys", _kv_header(b"", n_kv=(1 << 40))),
        # Metadata of the wrong kind where numbers are needed: NaN alignment, string layer counts.
        ("nan_alignment", _kv_header(_key(b"general.alignment") + struct.pack("<If", FLOAT32, float("nan")))),
        ("inf_alignment", _kv_header(_key(b"general.alignment") + struct.pack("<If", FLOAT32, float("inf")))),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_hostile_headers_are_format_errors(tmp_path: Path, case: str, header: bytes) -> None:
    """Regression: nested arrays (RecursionError), a 2^40-item array read from disk (MemoryError), NaN or
    infinite numbers where integers belong (ValueError/OverflowError): all GgufFormatError now."""
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(header + b"\0" * 64)
    with peak_allocation(MEMORY_BOUND):
        got = bounded(lambda: read_local(path, initial_bytes=64))
    assert isinstance(got, GgufFormatError), got
    parsed = bounded(lambda: parse_header(header + b"\0" * 64))
    assert isinstance(parsed, GgufFormatError | NeedMoreBytes), parsed
