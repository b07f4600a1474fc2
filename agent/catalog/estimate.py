"""Estimate the memory a GGUF model adds to the process when llama.cpp loads and serves it.

Pure arithmetic over a :class:`~agent.catalog.gguf_header.GgufInfo`; every term is reported so
``edge-agent plan`` can show where the bytes go. The formulas follow the llama.cpp vendored in
llama-cpp-python 0.3.36 (src/llama-context.cpp, llama-kv-cache*.cpp, ggml-cpu repack) and the
constants were calibrated on real loads (bench/estimate_accuracy.py; docs/fit.md has the numbers).

Terms (``estimate_bytes`` is their sum; ``process_overhead`` is reported separately):

* **weights**: every tensor's bytes. The file is mmap'd and all pages end up resident (RssFile),
  so it counts in full even though the kernel could drop clean pages under pressure.
* **repacked weights**: tensors that the CPU backend repacks for SIMD (e.g. Q4_0/Q4_K/IQ4_NL on
  AVX2 or ARM dotprod) are copied into anonymous memory *in addition to* the mapped file pages.
* **KV cache**: per layer ``cells x n_head_kv(layer) x (key_length + value_length) x sizeof(kv type)``
  with ``cells`` = n_ctx rounded up to 256; sliding-window layers get
  ``pad256(min(n_ctx, window + n_ubatch))`` cells unless ``swa_full`` (llama-cpp-python's default
  context params set ``swa_full = true``, so by default SWA layers get the full size).
* **compute**: the part of llama.cpp's compute buffer that a full-context prompt actually touches.
  The reserved buffer is far larger (it plans for logits of every token in a batch), but untouched
  pages never become resident. Without flash attention the attention scores dominate:
  ``n_ctx x n_ubatch x n_head x (4 + 2)`` bytes (f32 scores, f16 copy for KQ x V) plus f32 masks.
* **runtime overhead**: llama.cpp's vocabulary tables (about ``per_vocab`` bytes per token), the
  logits output buffer, llama-cpp-python's per-context arrays, thread work buffers, allocator slack.
* **process overhead** (separate): Python, llama_cpp, the agent's own modules; fixed.
"""

from __future__ import annotations

import platform
from typing import Final

import gguf
from pydantic import BaseModel, ConfigDict, Field, computed_field

from agent.catalog.gguf_header import GgufInfo

MiB: Final[int] = 1024 * 1024
KV_PAD: Final[int] = 256  # llama.cpp pads n_ctx and the SWA cache to 256 cells

#: Quant types the CPU backend repacks on each architecture (weights duplicated in anonymous memory).
#: x86-64 with AVX2 was measured; for aarch64 the set is the superset llama.cpp can repack (with
#: dotprod/i8mm), which at worst over-estimates a Pi 4 (no dotprod) a little.
REPACK_TYPES: Final[dict[str, frozenset[str]]] = {
    "x86_64": frozenset({"Q4_0", "Q4_K", "IQ4_NL"}),
    "aarch64": frozenset({"Q4_0", "Q4_K", "IQ4_NL", "Q8_0"}),
}
# Tensors used only through row lookups are never repacked (get_rows is not a repacked op).
_NEVER_REPACKED: Final[tuple[str, ...]] = ("token_embd.weight",)


class Calibration(BaseModel):
    """Constants measured on real llama.cpp loads (see bench/estimate_accuracy.py)."""

    model_config = ConfigDict(frozen=True)

    runtime_base_bytes: int = Field(default=3_750_000, description="Fixed llama.cpp + context overhead.")
    per_vocab_bytes: float = Field(default=204.0, description="Vocabulary tables per token (llama.cpp vocab).")
    per_merge_bytes: float = Field(default=178.0, description="BPE merge table per merge rule.")
    compute_base_bytes: int = Field(default=0, description="Fixed part of the touched compute buffer.")
    compute_act_factor: float = Field(
        default=1.19, description="Live f32 activations: factor x n_ubatch x (n_embd + n_ff) x 4 bytes."
    )
    process_overhead_bytes: int = Field(
        default=80 * MiB, description="Python + llama_cpp + agent modules (70 MiB measured on x86-64) + slack."
    )


DEFAULT_CALIBRATION: Final[Calibration] = Calibration()


def default_repack_types(machine: str | None = None) -> frozenset[str]:
    """Repacked quant types for ``machine`` (default: this one's ``platform.machine()``)."""
    arch = (machine or platform.machine()).lower()
    if arch in ("arm64", "aarch64"):
        arch = "aarch64"
    elif arch in ("amd64", "x86_64"):
        arch = "x86_64"
    return REPACK_TYPES.get(arch, frozenset())


def kv_type_size(kv_type: str) -> float:
    """Bytes per element of a KV cache type name ('f16', 'q8_0', ...)."""
    try:
        qtype = gguf.GGMLQuantizationType[kv_type.upper()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {kv_type!r}") from None
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size / block


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


class MemoryEstimate(BaseModel):
    """Each term of the estimate, in bytes, with the inputs that shaped it."""

    model_config = ConfigDict(frozen=True)

    n_ctx: int
    n_ctx_alloc: int = Field(description="n_ctx as llama.cpp allocates it (padded to 256).")
    n_ubatch: int
    kv_type: str
    swa_full: bool
    kv_cells_full: int
    kv_cells_swa: int | None
    weights_bytes: int
    repacked_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    runtime_overhead_bytes: int
    process_overhead_bytes: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def estimate_bytes(self) -> int:
        """What loading and running the model adds to the process (excludes process overhead)."""
        return (
            self.weights_bytes
            + self.repacked_bytes
            + self.kv_cache_bytes
            + self.compute_bytes
            + self.runtime_overhead_bytes
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_bytes(self) -> int:
        """``estimate_bytes`` plus the agent process itself."""
        return self.estimate_bytes + self.process_overhead_bytes

    def terms(self) -> dict[str, int]:
        """The terms by name (for JSON output and tables)."""
        return {
            "weights": self.weights_bytes,
            "repacked_weights": self.repacked_bytes,
            "kv_cache": self.kv_cache_bytes,
            "compute": self.compute_bytes,
            "runtime_overhead": self.runtime_overhead_bytes,
        }

    def explain(self) -> list[str]:
        """One line per term, then the totals."""
        swa = (
            f", SWA layers {self.kv_cells_swa} cells"
            if self.kv_cells_swa is not None and self.kv_cells_swa != self.kv_cells_full
            else ""
        )
        return [
            f"weights            {self.weights_bytes / MiB:9.1f} MiB  (tensor bytes, mmap'd)",
            f"repacked weights   {self.repacked_bytes / MiB:9.1f} MiB  (CPU SIMD copies of some tensors)",
            f"KV cache           {self.kv_cache_bytes / MiB:9.1f} MiB  "
            f"({self.kv_type}, {self.kv_cells_full} cells{swa})",
            f"compute            {self.compute_bytes / MiB:9.1f} MiB  "
            f"(n_ubatch {self.n_ubatch}, full context {self.n_ctx_alloc})",
            f"runtime overhead   {self.runtime_overhead_bytes / MiB:9.1f} MiB  (vocab tables, buffers)",
            f"= estimate         {self.estimate_bytes / MiB:9.1f} MiB",
            f"+ process          {self.process_overhead_bytes / MiB:9.1f} MiB  (Python + agent, fixed)",
            f"= total            {self.total_bytes / MiB:9.1f} MiB",
        ]


def estimate_memory(
    info: GgufInfo,
    n_ctx: int,
    *,
    n_batch: int = 512,
    n_ubatch: int = 512,
    kv_type: str = "f16",
    swa_full: bool = True,
    repack_types: frozenset[str] | None = None,
    calibration: Calibration = DEFAULT_CALIBRATION,
) -> MemoryEstimate:
    """Estimate the memory that loading ``info``'s model at ``n_ctx`` and serving a full context adds.

    Defaults match llama-cpp-python's ``Llama(...)`` defaults (f16 KV, ``swa_full`` true, flash
    attention off, ``n_ubatch`` 512). ``repack_types`` defaults to this machine's architecture; pass
    :func:`default_repack_types` of the target board when planning for another device.
    """
    if n_ctx < 1:
        raise ValueError("n_ctx must be positive")
    repack = default_repack_types() if repack_types is None else repack_types
    n_ctx_alloc = _pad(n_ctx, KV_PAD)
    ubatch = max(1, min(n_batch, n_ubatch, n_ctx_alloc))

    weights = info.tensor_bytes
    repacked = sum(
        t.n_bytes
        for t in info.tensors
        if t.type_name in repack and t.name not in _NEVER_REPACKED and len(t.dims) >= 2
    )

    elt = kv_type_size(kv_type)
    cells_swa: int | None = None
    if info.sliding_window and info.swa_layers:
        cells_swa = n_ctx_alloc if swa_full else _pad(min(n_ctx_alloc, info.sliding_window + ubatch), KV_PAD)
    kv = 0.0
    for layer in range(info.n_layer):
        cells = cells_swa if (cells_swa is not None and info.is_swa(layer)) else n_ctx_alloc
        kv += cells * info.head_kv(layer) * (info.key_length + info.value_length) * elt
    kv_bytes = int(kv)

    n_head = info.n_head if isinstance(info.n_head, int) else max(info.n_head)
    n_ff = int(_first_int(info.metadata.get(f"{info.architecture}.feed_forward_length")) or 4 * info.n_embd)
    n_masks = 2 if cells_swa is not None else 1
    # Attention scores over the whole cache for one ubatch (f32; softmax runs in place), the f32 masks,
    # and the thread work buffer holding the scores converted to the V cache's dot type for KQ x V.
    scores = n_ctx_alloc * ubatch * n_head * 4
    masks = n_masks * n_ctx_alloc * ubatch * 4
    work = n_ctx_alloc * ubatch * n_head * (elt if kv_type.lower() not in ("f32",) else 0)
    activations = calibration.compute_act_factor * ubatch * (info.n_embd + n_ff) * 4
    compute = int(calibration.compute_base_bytes + scores + masks + work + activations)

    vocab = info.vocab_size or 0
    runtime = int(
        calibration.runtime_base_bytes
        + calibration.per_vocab_bytes * vocab
        + calibration.per_merge_bytes * (_first_int(info.metadata.get("tokenizer.ggml.merges")) or 0)
        + vocab * 4  # logits output buffer (one row)
        + n_ctx_alloc * 4  # llama-cpp-python input_ids
        # llama-cpp-python's batch gives each of n_batch tokens a seq-id array of n_ctx entries;
        # only their first page is ever written.
        + n_batch * min(n_ctx_alloc * 4, 4096)
    )
    return MemoryEstimate(
        n_ctx=n_ctx,
        n_ctx_alloc=n_ctx_alloc,
        n_ubatch=ubatch,
        kv_type=kv_type,
        swa_full=swa_full,
        kv_cells_full=n_ctx_alloc,
        kv_cells_swa=cells_swa,
        weights_bytes=weights,
        repacked_bytes=repacked,
        kv_cache_bytes=kv_bytes,
        compute_bytes=compute,
        runtime_overhead_bytes=runtime,
        process_overhead_bytes=calibration.process_overhead_bytes,
    )


def _first_int(value: object) -> int | None:
    if isinstance(value, list):
        return max(int(v) for v in value) if value else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return None
