"""GGUF header parsing: real files written by the gguf package, prefixes, corrupt input."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from agent.catalog.gguf_header import (
    GgufFormatError,
    NeedMoreBytes,
    parse_header,
    read_local,
)
from agent.errors import AgentError, ModelFileError
from tests.support.tiny_gguf import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Q8_0 llama with GQA (4 query heads, 2 KV heads)."""
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tensor_type="Q8_0")


def _write_custom(path: Path, arch: str, kv: dict[str, object], tensors: dict[str, np.ndarray]) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    for key, value in kv.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_string(key, str(value))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_reads_hyperparameters_of_a_real_file(tiny: Path) -> None:
    """Architecture, layer count, widths, GQA heads and vocab come from the metadata."""
    info = read_local(tiny)
    assert info.architecture == "llama"
    assert info.name == "tiny-llama"
    assert (info.n_layer, info.n_embd, info.n_head, info.n_head_kv) == (2, 64, 4, 2)
    assert info.key_length == info.value_length == 16
    assert info.vocab_size == 512
    assert info.context_length == 2048
    assert info.quant == "Q8_0"
    assert info.has_chat_template


def test_tensor_bytes_add_up_to_the_file_size(tiny: Path) -> None:
    """Header size plus every tensor's block-size-derived bytes is the file size (no padding after)."""
    info = read_local(tiny)
    last = max(info.tensors, key=lambda t: t.offset)
    assert info.data_offset + last.offset + last.n_bytes == tiny.stat().st_size
    assert info.tensor_bytes == sum(t.n_bytes for t in info.tensors)


def test_tensor_sizes_follow_ggml_block_sizes(tiny: Path) -> None:
    """A Q8_0 matrix takes 34 bytes per 32 weights; norms stay F32 at 4 bytes per weight."""
    info = read_local(tiny)
    by_name = {t.name: t for t in info.tensors}
    q = by_name["blk.0.attn_q.weight"]
    assert q.type_name == "Q8_0"
    assert q.n_bytes == 64 * 64 // 32 * 34
    norm = by_name["blk.0.attn_norm.weight"]
    assert (norm.type_name, norm.n_bytes) == ("F32", 64 * 4)


def test_no_chat_template_is_reported(tmp_path: Path) -> None:
    """A file without tokenizer.chat_template says so."""
    info = read_local(write_tiny_llama(tmp_path / "plain.gguf", chat_template=None))
    assert not info.has_chat_template


def test_short_buffer_asks_for_more_bytes(tiny: Path) -> None:
    """Every too-short prefix raises NeedMoreBytes with a bound beyond the prefix; growing it succeeds."""
    data = tiny.read_bytes()
    full = parse_header(data)
    buf = data[:16]
    rounds = 0
    needs: list[tuple[int, int]] = []
    while True:
        try:
            info = parse_header(buf)
            break
        except NeedMoreBytes as more:
            needs.append((len(buf), more.needed))
            buf = data[: max(more.needed, len(buf) + 1)]
            rounds += 1
    assert all(needed > have for have, needed in needs)
    assert issubclass(NeedMoreBytes, AgentError)
    assert rounds > 3
    assert info == full


def test_prefix_ending_at_the_tensor_table_is_enough(tiny: Path) -> None:
    """The header alone (no tensor data) parses: what an HTTP Range request fetches."""
    data = tiny.read_bytes()
    info = parse_header(data)
    assert parse_header(data[: info.data_offset]) == info


def test_not_gguf_is_a_format_error() -> None:
    """Wrong magic raises GgufFormatError (a ValueError), not NeedMoreBytes."""
    with pytest.raises(GgufFormatError, match="not a GGUF file"):
        parse_header(b"PK\x03\x04" + b"\0" * 60)
    assert issubclass(GgufFormatError, ValueError)


def test_unsupported_version_is_a_format_error() -> None:
    """GGUF v1 (32-bit counts) and unknown versions are refused with the version named."""
    with pytest.raises(GgufFormatError, match="version 1"):
        parse_header(b"GGUF" + struct.pack("<I", 1) + b"\0" * 32)


def test_corrupt_string_length_is_a_format_error(tiny: Path) -> None:
    """An absurd string length fails fast instead of asking for gigabytes."""
    data = bytearray(tiny.read_bytes()[:64])
    struct.pack_into("<Q", data, 24, 1 << 60)  # length of the first key
    with pytest.raises(GgufFormatError, match="corrupt"):
        parse_header(bytes(data))


def test_big_endian_files_are_read(tmp_path: Path) -> None:
    """Byte-swapped GGUF files (written by gguf with endianess=BIG) parse the same."""
    path = tmp_path / "be.gguf"
    writer = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_head_count(2)
    writer.add_tensor("w", np.zeros((4, 32), dtype=np.float32).byteswap())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_local(path)
    assert (info.n_layer, info.n_embd, info.n_head, info.n_head_kv) == (1, 32, 2, 2)
    assert info.tensor_bytes == 4 * 32 * 4


def test_sliding_window_layers_follow_llama_cpp_default_pattern(tmp_path: Path) -> None:
    """Gemma 3 with a window and no pattern key: every 6th layer is global, the rest slide."""
    path = _write_custom(
        tmp_path / "g3.gguf",
        "gemma3",
        {
            "gemma3.block_count": 12,
            "gemma3.embedding_length": 64,
            "gemma3.attention.head_count": 4,
            "gemma3.attention.head_count_kv": 1,
            "gemma3.attention.key_length": 32,
            "gemma3.attention.value_length": 32,
            "gemma3.attention.sliding_window": 512,
        },
        {"w": np.zeros((2, 32), dtype=np.float32)},
    )
    info = read_local(path)
    assert info.sliding_window == 512
    assert info.swa_layers == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    assert not info.is_swa(5)


def test_per_layer_kv_heads_are_kept_as_a_tuple(tmp_path: Path) -> None:
    """An array head_count_kv (attention-free layers have 0) stays per layer."""
    path = _write_custom(
        tmp_path / "mixed.gguf",
        "llama",
        {
            "llama.block_count": 3,
            "llama.embedding_length": 64,
            "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": [2, 0, 2],
        },
        {"w": np.zeros((2, 32), dtype=np.float32)},
    )
    info = read_local(path)
    assert info.n_head_kv == (2, 0, 2)
    assert [info.head_kv(i) for i in range(3)] == [2, 0, 2]


def test_phi3_window_is_ignored_like_llama_cpp_does(tmp_path: Path) -> None:
    """llama.cpp disables Phi-3's sliding window, so every layer keeps a full cache."""
    path = _write_custom(
        tmp_path / "phi3.gguf",
        "phi3",
        {
            "phi3.block_count": 2,
            "phi3.embedding_length": 64,
            "phi3.attention.head_count": 4,
            "phi3.attention.sliding_window": 2047,
        },
        {"w": np.zeros((2, 32), dtype=np.float32)},
    )
    info = read_local(path)
    assert info.sliding_window is None
    assert info.swa_layers == ()


def test_read_local_reads_only_the_header(tmp_path: Path) -> None:
    """A file truncated right after its header still parses: tensor data is never read."""
    full = write_tiny_llama(tmp_path / "full.gguf")
    info = read_local(full)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[: info.data_offset])
    assert read_local(cut, initial_bytes=256) == info


def test_truncated_header_is_a_format_error(tmp_path: Path) -> None:
    """A file that ends inside its header is reported as such, not retried forever."""
    full = write_tiny_llama(tmp_path / "full.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:1000])
    with pytest.raises(GgufFormatError, match="ends inside the GGUF header"):
        read_local(cut, initial_bytes=256)


def test_missing_file_is_a_model_file_error(tmp_path: Path) -> None:
    """A missing path raises ModelFileError (a FileNotFoundError) naming the path."""
    with pytest.raises(ModelFileError, match=r"missing\.gguf"):
        read_local(tmp_path / "missing.gguf")
