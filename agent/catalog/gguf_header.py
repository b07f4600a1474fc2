"""Read a GGUF file's header (metadata and tensor table) without loading the model.

The header sits at the start of the file, so the same pure parser serves a local file and the first
bytes of a Hub file fetched with an HTTP Range request: :func:`parse_header` works on a bytes buffer
and raises :class:`NeedMoreBytes` when the buffer ends too early, naming how many bytes it needs at
least, so the caller can fetch a longer prefix and retry. :func:`read_local` does that with a file.

Format (little-endian, or big-endian for the rare byte-swapped files): magic ``GGUF``, uint32 version
(2 or 3), uint64 tensor count, uint64 metadata count, the metadata key/value pairs, then per tensor:
name, uint32 n_dims, uint64 dims, uint32 ggml type, uint64 offset into the (aligned) data section.
Tensor byte sizes come from gguf's ``GGML_QUANT_SIZES`` (block size, bytes per block), the same table
llama.cpp's converters use, so new quant types arrive with a ``gguf`` upgrade rather than a retyped table.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import gguf
from pydantic import BaseModel, ConfigDict, Field

from agent.errors import AgentError, ModelFileError

GGUF_MAGIC: Final[bytes] = b"GGUF"
SUPPORTED_VERSIONS: Final[tuple[int, ...]] = (2, 3)
DEFAULT_ALIGNMENT: Final[int] = 32

#: First read size for local files and a sensible first Range request: big enough for small models'
#: headers; models with 150k+ token vocabularies need a few MiB (the token list is in the header).
INITIAL_READ_BYTES: Final[int] = 1 << 20

#: Arrays longer than this are skipped (length kept) rather than stored: token lists and merges are
#: hundreds of thousands of entries and only their length matters here.
MAX_STORED_ARRAY: Final[int] = 4096

#: Sanity limits so a corrupt or hostile header fails fast instead of allocating gigabytes.
_MAX_STRING_BYTES: Final[int] = 64 << 20
_MAX_COUNT: Final[int] = 1 << 40
_MAX_DIMS: Final[int] = 8
_MAX_ARRAY_NESTING: Final[int] = 8  # llama.cpp reads no nested arrays at all; each level is a Python frame

# llama.cpp's per-architecture default sliding-window pattern when the file gives none:
# (period, dense_first), see load_swa_pattern() calls in llama.cpp's src/models/*.cpp.
# Gemma 2 also defaults the window itself to 4096.
_SWA_DEFAULT_PATTERN: Final[dict[str, tuple[int, bool]]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "exaone4": (4, False),
    "llama4": (4, False),
    "olmo2": (4, False),
    "gpt-oss": (2, False),
}
_SWA_DEFAULT_WINDOW: Final[dict[str, int]] = {"gemma2": 4096}
# Architectures whose sliding window llama.cpp ignores (full cache on every layer).
_SWA_DISABLED: Final[frozenset[str]] = frozenset({"phi3"})


class NeedMoreBytes(AgentError):  # noqa: N818 -- the Hub reader's contract names it so
    """The buffer ends inside the header; retry with at least ``needed`` bytes from the file start.

    ``needed`` is a lower bound (the parser only knows the next item's size); growing the buffer to
    ``max(needed, 2 * len(buffer))`` keeps the number of retries logarithmic.
    """

    code = "internal"

    def __init__(self, needed: int) -> None:
        super().__init__(f"GGUF header continues past the buffer; need at least {needed} bytes")
        self.needed = needed


class GgufFormatError(AgentError, ValueError):
    """The bytes are not a GGUF file we can read (bad magic, unsupported version, corrupt header)."""

    code = "model_unavailable"


class GgufTensor(BaseModel):
    """One tensor's entry in the header; ``n_bytes`` is its size in the data section."""

    model_config = ConfigDict(frozen=True)

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int
    n_bytes: int


class GgufInfo(BaseModel):
    """What choosing and sizing a model needs from its GGUF header."""

    model_config = ConfigDict(frozen=True)

    version: int
    architecture: str
    name: str | None = None
    n_layer: int = Field(description="Transformer blocks (``<arch>.block_count``).")
    n_embd: int
    n_head: int | tuple[int, ...] = Field(description="Query heads, or one count per layer.")
    n_head_kv: int | tuple[int, ...] = Field(description="KV heads (GQA), or one count per layer.")
    key_length: int = Field(description="Per-head K size (``attention.key_length``, else n_embd/n_head).")
    value_length: int = Field(description="Per-head V size (``attention.value_length``, else key_length).")
    sliding_window: int | None = Field(default=None, description="SWA window in tokens, None = no SWA layers.")
    swa_layers: tuple[bool, ...] = Field(default=(), description="Per layer: uses the sliding window.")
    context_length: int | None = Field(default=None, description="Training context (``<arch>.context_length``).")
    vocab_size: int | None = None
    file_type: int | None = Field(default=None, description="``general.file_type`` (llama_ftype).")
    quant: str | None = Field(default=None, description="Quant tag from file_type, e.g. 'Q4_K_M'.")
    has_chat_template: bool = False
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = Field(description="Where the tensor data starts (header size incl. padding).")
    tensor_bytes: int = Field(description="Sum of all tensors' bytes: what the weights occupy.")
    tensors: tuple[GgufTensor, ...] = ()
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Scalar and short-array metadata; long arrays as their length."
    )

    def head_kv(self, layer: int) -> int:
        """KV heads of ``layer`` (per-layer arrays are how some models mark attention-free layers)."""
        return self.n_head_kv if isinstance(self.n_head_kv, int) else self.n_head_kv[layer]

    def is_swa(self, layer: int) -> bool:
        """Whether ``layer`` uses the sliding window (and so a possibly smaller KV cache)."""
        return bool(self.swa_layers) and self.swa_layers[layer]


class _SkippedArray(int):
    """Length of an array too long to keep (an ``int`` subclass so ``len``-like use stays natural)."""


class _Reader:
    """A cursor over the buffer that raises NeedMoreBytes instead of reading past its end."""

    def __init__(self, buf: bytes | bytearray | memoryview, endian: str) -> None:
        self.buf = memoryview(buf)
        self.pos = 0
        self.endian = endian

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise NeedMoreBytes(end)
        view = self.buf[self.pos : end]
        self.pos = end
        return view

    def unpack(self, fmt: str) -> Any:
        st = struct.Struct(self.endian + fmt)
        return st.unpack(self.take(st.size))[0]

    def u32(self) -> int:
        return int(self.unpack("I"))

    def u64(self) -> int:
        return int(self.unpack("Q"))

    def string(self) -> str:
        n = self.u64()
        if n > _MAX_STRING_BYTES:
            raise GgufFormatError(f"GGUF string of {n} bytes at offset {self.pos}: the file is corrupt")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.u64()
        if n > _MAX_STRING_BYTES:
            raise GgufFormatError(f"GGUF string of {n} bytes at offset {self.pos}: the file is corrupt")
        self.take(n)

    def skip_strings(self, count: int) -> None:
        # Hot path: a 262k-token vocabulary is skipped in a tight loop, not item by item.
        length = struct.Struct(self.endian + "Q")
        buf, pos, size = self.buf, self.pos, len(self.buf)
        for _ in range(count):
            if pos + 8 > size:
                raise NeedMoreBytes(pos + 8)
            (n,) = length.unpack_from(buf, pos)
            if n > _MAX_STRING_BYTES:
                raise GgufFormatError(f"GGUF string of {n} bytes at offset {pos}: the file is corrupt")
            pos += 8 + n
        if pos > size:
            raise NeedMoreBytes(pos)
        self.pos = pos


_SCALAR_FORMATS: Final[dict[int, str]] = {
    gguf.GGUFValueType.UINT8: "B",
    gguf.GGUFValueType.INT8: "b",
    gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h",
    gguf.GGUFValueType.UINT32: "I",
    gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f",
    gguf.GGUFValueType.BOOL: "?",
    gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT64: "d",
}


def _read_value(r: _Reader, vtype: int, *, keep: bool = True, depth: int = 0) -> Any:  # noqa: PLR0911 -- one per type
    if vtype in _SCALAR_FORMATS:
        return r.unpack(_SCALAR_FORMATS[vtype])
    if vtype == gguf.GGUFValueType.STRING:
        if keep:
            return r.string()
        r.skip_string()
        return None
    if vtype == gguf.GGUFValueType.ARRAY:
        etype = r.u32()
        count = r.u64()
        if count > _MAX_COUNT:
            raise GgufFormatError(f"GGUF array of {count} items: the file is corrupt")
        store = keep and count <= MAX_STORED_ARRAY
        if etype in _SCALAR_FORMATS and not store:
            # Fixed-size items: skip them in one step.
            r.take(struct.calcsize(r.endian + _SCALAR_FORMATS[etype]) * count)
            return _SkippedArray(count)
        if etype in _SCALAR_FORMATS:
            st = struct.Struct(f"{r.endian}{count}{_SCALAR_FORMATS[etype]}")
            return list(st.unpack(r.take(st.size)))
        if etype == gguf.GGUFValueType.STRING and not store:
            r.skip_strings(count)
            return _SkippedArray(count)
        if etype == gguf.GGUFValueType.ARRAY and depth >= _MAX_ARRAY_NESTING:
            raise GgufFormatError(f"GGUF arrays nested deeper than {_MAX_ARRAY_NESTING} at offset {r.pos}: corrupt")
        items = [_read_value(r, etype, keep=store, depth=depth + 1) for _ in range(count)]
        return items if store else _SkippedArray(count)
    raise GgufFormatError(f"unknown GGUF value type {vtype} at offset {r.pos}: the file is corrupt")


def _tensor_bytes(dims: Sequence[int], ggml_type: int, name: str) -> tuple[str, int]:
    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
    except ValueError as exc:
        raise GgufFormatError(
            f"tensor {name!r} has ggml type {ggml_type}, unknown to gguf {gguf.__name__}: "
            "upgrade the 'gguf' package"
        ) from exc
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_elements = 1
    for d in dims:
        n_elements *= d
    if dims and dims[0] % block_size != 0:
        raise GgufFormatError(f"tensor {name!r}: row length {dims[0]} is not a multiple of {block_size}")
    return qtype.name, n_elements // block_size * type_size


def _detect_endian(buf: bytes | bytearray | memoryview) -> str:
    if len(buf) < 8:
        raise NeedMoreBytes(8)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise GgufFormatError(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    (version_le,) = struct.unpack_from("<I", buf, 4)
    if version_le in SUPPORTED_VERSIONS:
        return "<"
    (version_be,) = struct.unpack_from(">I", buf, 4)
    if version_be in SUPPORTED_VERSIONS:
        return ">"
    raise GgufFormatError(
        f"GGUF version {version_le} is not supported (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
    )


def parse_header(buf: bytes | bytearray | memoryview) -> GgufInfo:
    """Parse the GGUF header at the start of ``buf`` (the whole file or any long enough prefix).

    Raises :class:`NeedMoreBytes` when ``buf`` ends inside the header and :class:`GgufFormatError`
    when the bytes are not a readable GGUF v2/v3 header.
    """
    r = _Reader(buf, _detect_endian(buf))
    r.take(4)
    version = r.u32()
    n_tensors = r.u64()
    n_kv = r.u64()
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise GgufFormatError(f"implausible GGUF counts ({n_tensors} tensors, {n_kv} keys): corrupt file")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        vtype = r.u32()
        metadata[key] = _read_value(r, vtype)
    tensors: list[GgufTensor] = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        if n_dims > _MAX_DIMS:
            raise GgufFormatError(f"tensor {name!r} has {n_dims} dimensions: the file is corrupt")
        dims = tuple(r.u64() for _ in range(n_dims))
        ggml_type = r.u32()
        offset = r.u64()
        type_name, n_bytes = _tensor_bytes(dims, ggml_type, name)
        tensors.append(
            GgufTensor(
                name=name, dims=dims, ggml_type=ggml_type, type_name=type_name, offset=offset, n_bytes=n_bytes
            )
        )
    try:
        alignment = _as_int(metadata.get("general.alignment")) or DEFAULT_ALIGNMENT
        data_offset = -(-r.pos // alignment) * alignment
        return _build_info(version, metadata, tensors, alignment, data_offset)
    except GgufFormatError:
        raise
    except (ValueError, TypeError, ArithmeticError, LookupError) as exc:  # int(NaN), a string where a count is
        raise GgufFormatError(f"GGUF metadata of the wrong kind ({type(exc).__name__}: {exc}): corrupt file") from exc


def _as_int(value: Any) -> int | None:
    if value is None or isinstance(value, (list, str)):
        return None
    return int(value)


def _per_layer(value: Any, n_layer: int, what: str) -> int | tuple[int, ...]:
    """An int, or a per-layer tuple when the file stores an array (checked to have n_layer items)."""
    if isinstance(value, list):
        if len(value) != n_layer:
            raise GgufFormatError(f"{what} has {len(value)} entries for {n_layer} layers")
        items = tuple(int(v) for v in value)
        return items[0] if len(set(items)) == 1 else items
    if value is None:
        raise GgufFormatError(f"GGUF metadata lacks {what}")
    return int(value)


def _swa_layers(arch: str, metadata: dict[str, Any], n_layer: int) -> tuple[int | None, tuple[bool, ...]]:
    """Sliding window size and per-layer SWA flags the way llama.cpp derives them."""
    window = _as_int(metadata.get(f"{arch}.attention.sliding_window")) or _SWA_DEFAULT_WINDOW.get(arch)
    if not window or arch in _SWA_DISABLED or arch not in _SWA_DEFAULT_PATTERN:
        # Architectures without SWA support in llama.cpp keep a full cache on every layer.
        return None, ()
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == n_layer:
        return window, tuple(bool(p) for p in pattern)
    period, dense_first = _SWA_DEFAULT_PATTERN[arch]
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        period = pattern
    if dense_first:
        flags = tuple(period == 0 or il % period != 0 for il in range(n_layer))
    else:
        flags = tuple(period == 0 or il % period < period - 1 for il in range(n_layer))
    return window, flags


def _quant_from_file_type(file_type: int | None) -> str | None:
    if file_type is None:
        return None
    try:
        name = gguf.LlamaFileType(file_type).name
    except ValueError:
        return None
    if name == "GUESSED":
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _build_info(
    version: int, metadata: dict[str, Any], tensors: list[GgufTensor], alignment: int, data_offset: int
) -> GgufInfo:
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise GgufFormatError("GGUF metadata lacks general.architecture")
    n_layer = _as_int(metadata.get(f"{arch}.block_count"))
    n_embd = _as_int(metadata.get(f"{arch}.embedding_length"))
    if n_layer is None or n_embd is None:
        raise GgufFormatError(f"GGUF metadata lacks {arch}.block_count or {arch}.embedding_length")
    n_head = _per_layer(metadata.get(f"{arch}.attention.head_count"), n_layer, f"{arch}.attention.head_count")
    kv_raw = metadata.get(f"{arch}.attention.head_count_kv", metadata.get(f"{arch}.attention.head_count"))
    n_head_kv = _per_layer(kv_raw, n_layer, f"{arch}.attention.head_count_kv")
    first_heads = n_head if isinstance(n_head, int) else max(n_head)
    key_length = _as_int(metadata.get(f"{arch}.attention.key_length")) or (
        n_embd // first_heads if first_heads else 0
    )
    value_length = _as_int(metadata.get(f"{arch}.attention.value_length")) or key_length
    window, swa = _swa_layers(arch, metadata, n_layer)
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = _as_int(metadata.get(f"{arch}.vocab_size"))
    if vocab_size is None and tokens is not None:
        vocab_size = int(tokens) if isinstance(tokens, _SkippedArray) else len(tokens)
    file_type = _as_int(metadata.get("general.file_type"))
    small_meta = {
        k: (int(v) if isinstance(v, _SkippedArray) else v)
        for k, v in metadata.items()
        if not (isinstance(v, str) and len(v) > 1024)
    }
    name = metadata.get("general.name")
    return GgufInfo(
        version=version,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        key_length=key_length,
        value_length=value_length,
        sliding_window=window,
        swa_layers=swa,
        context_length=_as_int(metadata.get(f"{arch}.context_length")),
        vocab_size=vocab_size,
        file_type=file_type,
        quant=_quant_from_file_type(file_type),
        has_chat_template=isinstance(metadata.get("tokenizer.chat_template"), str),
        alignment=alignment,
        data_offset=data_offset,
        tensor_bytes=sum(t.n_bytes for t in tensors),
        tensors=tuple(tensors),
        metadata=small_meta,
    )


def read_local(path: Path, *, initial_bytes: int = INITIAL_READ_BYTES) -> GgufInfo:
    """Parse the header of a local GGUF file, reading only as much of the file as the header needs.

    Raises :class:`~agent.errors.ModelFileError` when the file cannot be read and
    :class:`GgufFormatError` when it is not a GGUF file (or is truncated inside its header).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = f.read(initial_bytes)
            while True:
                try:
                    return parse_header(buf)
                except GgufFormatError as exc:
                    # The parser sees bytes, not files: say which file, the operator's first question.
                    raise GgufFormatError(f"{path}: {exc}") from exc
                except NeedMoreBytes as more:
                    # Never read past the file: a corrupt count can ask for terabytes (a MemoryError).
                    want = min(max(more.needed, 2 * len(buf)), max(size, len(buf)))
                    chunk = f.read(want - len(buf)) if more.needed <= size else b""
                    if len(buf) + len(chunk) < more.needed:
                        raise GgufFormatError(
                            f"{path}: file ends inside the GGUF header "
                            f"({len(buf) + len(chunk)} bytes, header needs more than {more.needed - 1})"
                        ) from None
                    # A new bytes object: the failed parse may still hold a view of the old one.
                    buf = buf + chunk
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
