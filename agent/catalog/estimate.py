"""Estimate the memory a GGUF model adds to the process when llama.cpp loads and serves it.

Pure arithmetic over a :class:`~agent.catalog.gguf_header.GgufInfo`; every term is reported so
``edge-agent plan`` can show where the bytes go. The formulas follow the llama.cpp vendored in
llama-cpp-python 0.3.36 (src/llama-context.cpp, llama-kv-cache*.cpp, ggml-cpu repack) and the
constants were calibrated on real loads (bench/estimate_accuracy.py; docs/fit.md has the numbers).

Terms (``estimate_bytes`` is their sum; ``process_overhead`` is reported separately):

* **weights**: every tensor's bytes, once: mapped file pages (mmap) or the CPU buffer the file is
  read into (no mmap). Mapped pages all end up resident (RssFile), so they count in full even though
  the kernel could drop clean pages under pressure.
* **repacked weights**: tensors that the CPU backend repacks for SIMD (which ones depends on the CPU
  features of the build: :func:`repack_types_for`) live in anonymous memory. With mmap that copy
  comes *in addition to* the mapped pages; without mmap they are read straight into the repack
  buffer, so they count once (:func:`load_with_mmap` turns mmap off when most weights are repacked).
* **KV cache**: the agent's engine creates one unified cache of ``pad256(n_ctx x n_seq)`` cells
  (``n_seq`` slots, each capped at n_ctx). Per layer ``cells x n_head_kv(layer) x (key_length +
  value_length) x sizeof(kv type)``; sliding-window layers get ``pad256(min(cells, window x n_seq +
  n_ubatch))`` cells unless ``swa_full``.
* **compute**: the part of llama.cpp's compute buffer that a prompt batch over a full cache actually
  touches. The reserved buffer is far larger (it plans for logits of every token in a batch), but
  untouched pages never become resident. Without flash attention the attention scores dominate:
  ``cells x n_ubatch x n_head x (4 + 2)`` bytes (f32 scores, f16 copy for KQ x V) plus f32 masks;
  with flash attention (needed for a q8_0 cache) the scores are never materialized and the mask is f16.
* **runtime overhead**: llama.cpp's vocabulary tables (about ``per_vocab`` bytes per token), the
  logits rows of the slots, thread work buffers, allocator slack.
* **process overhead** (separate): Python, llama_cpp, the agent's own modules; fixed.
"""

from __future__ import annotations

import platform
from typing import Final

import gguf
from pydantic import BaseModel, ConfigDict, Field, computed_field

from agent.catalog.gguf_header import GgufInfo, GgufTensor

MiB: Final[int] = 1024 * 1024
KV_PAD: Final[int] = 256  # llama.cpp pads n_ctx and the SWA cache to 256 cells

# Tensors used only through row lookups are never repacked (get_rows is not a repacked op).
_NEVER_REPACKED: Final[tuple[str, ...]] = ("token_embd.weight",)
# ggml-cpu's choice (ggml_repack_get_optimal_repack_type in repack.cpp of the llama.cpp that
# llama-cpp-python 0.3.36 vendors; its library exports exactly these repacked kernels), by the features
# of the build. On aarch64 NEON is always there: IQ4_NL is repacked with NEON alone; the other types need
# dotprod or i8mm (SVE counts only together with i8mm). x86: AVX2, and AVX-512 for Q2_K.
_X86_AVX2: Final[frozenset[str]] = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})
_X86_AVX512: Final[frozenset[str]] = frozenset({"Q2_K"})
_ARM_NEON: Final[frozenset[str]] = frozenset({"IQ4_NL"})
_ARM_DOTPROD: Final[frozenset[str]] = frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "MXFP4", "Q1_0"})
_ARM_I8MM: Final[frozenset[str]] = frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q1_0"})
#: What a build is assumed to have when nobody says (planning for another board by its architecture
#: name alone): x86-64 with AVX2 as measured here; aarch64 with dotprod and i8mm, the superset, so an
#: unknown ARM board is over- rather than under-estimated.
ASSUMED_FEATURES: Final[dict[str, frozenset[str]]] = {
    "x86_64": frozenset({"avx2"}),
    "aarch64": frozenset({"neon", "dotprod", "i8mm"}),
}


def _arch(machine: str) -> str:
    arch = machine.lower()
    if arch in ("arm64", "aarch64"):
        return "aarch64"
    if arch in ("amd64", "x86_64"):
        return "x86_64"
    return arch


def repack_types_for(machine: str, features: frozenset[str]) -> frozenset[str]:
    """Quant types llama.cpp's CPU backend repacks on ``machine`` with these build/CPU ``features``.

    ``features`` use the names of :mod:`agent.hardware.cpu_features` (``avx2``, ``avx512``, ``neon``,
    ``dotprod``, ``i8mm``, ``sve``). Pure: a Pi 4 (``asimd`` only) gets IQ4_NL alone, a Pi 5 (``asimddp``)
    gets Q4_0/Q4_K/Q5_K/Q6_K/Q8_0 too, an AVX2 x86-64 Q4_0/Q4_K/IQ4_NL/MXFP4.
    """
    arch = _arch(machine)
    out: set[str] = set()
    if arch == "x86_64":
        if "avx2" in features:
            out |= _X86_AVX2
        if "avx512" in features:
            out |= _X86_AVX512
    elif arch == "aarch64":
        out |= _ARM_NEON
        if "dotprod" in features:
            out |= _ARM_DOTPROD
        if "i8mm" in features:
            out |= _ARM_I8MM
    return frozenset(out)


class Calibration(BaseModel):
    """Constants measured on real llama.cpp loads (see bench/estimate_accuracy.py)."""

    model_config = ConfigDict(frozen=True)

    runtime_base_bytes: int = Field(default=5_320_000, description="Fixed llama.cpp + context overhead.")
    per_vocab_bytes: float = Field(default=204.0, description="Vocabulary tables per token (llama.cpp vocab).")
    per_merge_bytes: float = Field(default=178.0, description="BPE merge table per merge rule.")
    compute_base_bytes: int = Field(default=0, description="Fixed part of the touched compute buffer.")
    compute_act_factor: float = Field(
        default=1.19, description="Live f32 activations: factor x n_ubatch x (n_embd + n_ff) x 4 bytes."
    )
    fa_act_factor: float = Field(
        default=3.0,
        description="With flash attention: touched activations, factor x n_ubatch x (n_embd + n_ff) x 4 bytes.",
    )
    fa_base_bytes: int = Field(
        default=-1 * MiB, description="With flash attention: intercept of the fitted touched compute (negative)."
    )
    fa_mask_factor: float = Field(
        default=1.3, description="With flash attention: touched compute per f16 mask byte (cells x n_ubatch x 2)."
    )
    process_overhead_bytes: int = Field(
        default=80 * MiB, description="Python + llama_cpp + agent modules (70 MiB measured on x86-64) + slack."
    )


DEFAULT_CALIBRATION: Final[Calibration] = Calibration()


def default_repack_types(machine: str | None = None, features: frozenset[str] | None = None) -> frozenset[str]:
    """Repacked quant types for ``machine`` (default: this one) with ``features``.

    ``features`` None: this machine's ``/proc/cpuinfo`` when ``machine`` is None too, else the features
    assumed for that architecture (:data:`ASSUMED_FEATURES`). The engine knows better (the loaded
    build's ``llama_print_system_info()``): pass :func:`repack_types_for` of those instead.
    """
    if features is None:
        if machine is None:
            from agent.hardware.probe import read_cpu_features  # noqa: PLC0415 - I/O only on this default

            features = read_cpu_features()
        else:
            features = ASSUMED_FEATURES.get(_arch(machine), frozenset())
    return repack_types_for(machine or platform.machine(), features)


def _repacked(info: GgufInfo, repack_types: frozenset[str]) -> list[GgufTensor]:
    return [
        t for t in info.tensors
        if t.type_name in repack_types and t.name not in _NEVER_REPACKED and len(t.dims) >= 2
    ]


def repacked_bytes(info: GgufInfo, repack_types: frozenset[str]) -> int:
    """Bytes of the weights llama.cpp would repack: 2-D (and 3-D expert) matrices of a repacked type."""
    return sum(t.n_bytes for t in _repacked(info, repack_types))


def load_with_mmap(info: GgufInfo, repack_types: frozenset[str] | None = None) -> bool:
    """Whether to map the model file: False when most (> 50 %) of the weight bytes would be repacked.

    A repacked tensor lives in anonymous memory; with mmap its file pages become resident too, so it is
    paid twice. Otherwise mapping is better: the pages are shared and the kernel can reclaim them.
    ``repack_types`` None: this machine's (:func:`default_repack_types`).
    """
    repack = default_repack_types() if repack_types is None else repack_types
    return 2 * repacked_bytes(info, repack) <= info.tensor_bytes


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

    n_ctx: int = Field(description="Tokens per slot (each sequence is capped at n_ctx).")
    n_seq: int = Field(default=1, description="Slots: sequences decoded together on one unified KV cache.")
    n_ctx_alloc: int = Field(description="KV cells llama.cpp allocates: n_ctx x n_seq padded to 256.")
    n_ubatch: int
    kv_type: str
    flash_attn: bool = False
    swa_full: bool
    use_mmap: bool = True
    kv_cells_full: int
    kv_cells_swa: int | None
    weights_bytes: int
    repacked_bytes: int = Field(description="The second copy of repacked weights (0 without mmap).")
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

    @property
    def kv_per_slot_bytes(self) -> int:
        """The KV cache divided by the slots (what one more slot costs, roughly)."""
        return self.kv_cache_bytes // max(1, self.n_seq)

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
        slots = f", {self.n_seq} slots x {self.n_ctx} tokens, {self.kv_per_slot_bytes / MiB:.1f} MiB per slot"
        return [
            f"weights            {self.weights_bytes / MiB:9.1f} MiB  "
            + ("(tensor bytes, mmap'd)" if self.use_mmap else "(tensor bytes, read without mmap)"),
            f"repacked weights   {self.repacked_bytes / MiB:9.1f} MiB  "
            + ("(CPU SIMD copies of some tensors)" if self.use_mmap else "(no second copy without mmap)"),
            f"KV cache           {self.kv_cache_bytes / MiB:9.1f} MiB  "
            f"({self.kv_type}, {self.kv_cells_full} cells{swa}{slots})",
            f"compute            {self.compute_bytes / MiB:9.1f} MiB  "
            f"(n_ubatch {self.n_ubatch} over {self.n_ctx_alloc} cells"
            + (", flash attention)" if self.flash_attn else ")"),
            f"runtime overhead   {self.runtime_overhead_bytes / MiB:9.1f} MiB  (vocab tables, buffers)",
            f"= estimate         {self.estimate_bytes / MiB:9.1f} MiB",
            f"+ process          {self.process_overhead_bytes / MiB:9.1f} MiB  (Python + agent, fixed)",
            f"= total            {self.total_bytes / MiB:9.1f} MiB",
        ]


def estimate_memory(
    info: GgufInfo,
    n_ctx: int,
    *,
    n_seq: int = 1,
    n_batch: int = 512,
    n_ubatch: int = 512,
    kv_type: str = "f16",
    flash_attn: bool | None = None,
    swa_full: bool = False,
    use_mmap: bool | None = None,
    repack_types: frozenset[str] | None = None,
    calibration: Calibration = DEFAULT_CALIBRATION,
) -> MemoryEstimate:
    """Estimate the memory that loading ``info``'s model and serving ``n_seq`` full slots adds.

    Defaults are the agent engine's context: one unified KV cache of ``n_ctx x n_seq`` cells,
    ``swa_full`` off, f16 KV, flash attention only for a quantized cache (``flash_attn`` None),
    ``n_batch = n_ubatch`` 512. ``use_mmap`` None is :func:`load_with_mmap`'s answer. ``repack_types``
    defaults to this machine's; pass :func:`repack_types_for` of the target board to plan for another.
    """
    if n_ctx < 1:
        raise ValueError("n_ctx must be positive")
    if n_seq < 1:
        raise ValueError("n_seq must be positive")
    repack = default_repack_types() if repack_types is None else repack_types
    mmap = load_with_mmap(info, repack) if use_mmap is None else use_mmap
    fa = kv_type.lower() != "f16" if flash_attn is None else flash_attn
    cells = _pad(n_ctx * n_seq, KV_PAD)
    # The engine's batch: n_batch tokens, at most the whole cache (llama.cpp: n_ubatch <= n_batch).
    ubatch = max(1, min(n_batch, n_ubatch, n_ctx * n_seq))

    weights = info.tensor_bytes
    # Without mmap the repacked tensors are read straight into the repack buffer: counted once.
    repacked = repacked_bytes(info, repack) if mmap else 0

    elt = kv_type_size(kv_type)
    cells_swa: int | None = None
    if info.sliding_window and info.swa_layers:
        # llama-kv-cache-iswa.cpp with a unified cache: the window of every sequence plus one ubatch.
        cells_swa = cells if swa_full else _pad(min(cells, info.sliding_window * n_seq + ubatch), KV_PAD)
    kv = 0.0
    for layer in range(info.n_layer):
        layer_cells = cells_swa if (cells_swa is not None and info.is_swa(layer)) else cells
        kv += layer_cells * info.head_kv(layer) * (info.key_length + info.value_length) * elt
    kv_bytes = int(kv)

    n_head = info.n_head if isinstance(info.n_head, int) else max(info.n_head)
    n_ff = int(_first_int(info.metadata.get(f"{info.architecture}.feed_forward_length")) or 4 * info.n_embd)
    mask_cells = cells + (cells_swa or 0)
    width = ubatch * (info.n_embd + n_ff) * 4
    if fa:
        # Flash attention never materializes the scores (the masks are f16), so no large tensor holds
        # the activations in place: they spread over more of the buffer (measured, bench/estimate_accuracy.py).
        compute = int(
            calibration.fa_base_bytes
            + calibration.fa_act_factor * width
            + calibration.fa_mask_factor * mask_cells * ubatch * 2
        )
    else:
        # Attention scores over the whole cache for one ubatch (f32; softmax runs in place), the f32
        # masks, and the thread work buffer holding the scores converted to f16 for KQ x V.
        attention = cells * ubatch * n_head * (4 + 2) + mask_cells * ubatch * 4
        compute = int(calibration.compute_base_bytes + attention + calibration.compute_act_factor * width)

    vocab = info.vocab_size or 0
    # Without mmap llama.cpp reads each repacked tensor through one staging buffer (load_all_data's
    # read_buf) as large as the largest of them; the allocator keeps those pages.
    read_buf = 0 if mmap else max((t.n_bytes for t in _repacked(info, repack)), default=0)
    runtime = int(
        read_buf
        + calibration.runtime_base_bytes
        + calibration.per_vocab_bytes * vocab
        + calibration.per_merge_bytes * (_first_int(info.metadata.get("tokenizer.ggml.merges")) or 0)
        + n_seq * vocab * 4  # the logits rows written when every slot decodes a token
    )
    return MemoryEstimate(
        n_ctx=n_ctx,
        n_seq=n_seq,
        n_ctx_alloc=cells,
        n_ubatch=ubatch,
        kv_type=kv_type,
        flash_attn=fa,
        swa_full=swa_full,
        use_mmap=mmap,
        kv_cells_full=cells,
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
