"""The memory estimate's parts that issue 12 added: mmap choice, slots, KV type, repack sets by CPU feature."""

from __future__ import annotations

from itertools import pairwise

import pytest

from agent.catalog.estimate import (
    default_repack_types,
    estimate_memory,
    load_with_mmap,
    repack_types_for,
    repacked_bytes,
)
from agent.catalog.gguf_header import GgufInfo, GgufTensor
from agent.hardware.cpu_features import features_from_cpuinfo, features_from_system_info
from tests.unit.test_cpu_features import (
    GRAVITON3_CPUINFO,
    PI4_CPUINFO,
    PI5_CPUINFO,
    SYSINFO_ARM_DOTPROD,
    SYSINFO_ARM_GENERIC,
    SYSINFO_X86,
    X86_CPUINFO,
)

MiB = 1024 * 1024


def _tensor(name: str, type_name: str, n_bytes: int, dims: tuple[int, ...] = (256, 256)) -> GgufTensor:
    return GgufTensor(name=name, dims=dims, ggml_type=0, type_name=type_name, offset=0, n_bytes=n_bytes)


def _info(*tensors: GgufTensor, n_layer: int = 4, swa: int | None = None) -> GgufInfo:
    """A LLaMA-like header: 4 layers, 4 heads (2 KV) of 64, 2048-token vocabulary."""
    return GgufInfo(
        version=3,
        architecture="llama",
        n_layer=n_layer,
        n_embd=256,
        n_head=4,
        n_head_kv=2,
        key_length=64,
        value_length=64,
        sliding_window=swa,
        swa_layers=tuple(il % 2 == 0 for il in range(n_layer)) if swa else (),
        vocab_size=2048,
        data_offset=0,
        tensor_bytes=sum(t.n_bytes for t in tensors),
        tensors=tensors,
        metadata={"llama.feed_forward_length": 512},
    )


def _mixed(repacked: int, plain: int) -> GgufInfo:
    """``repacked`` bytes of Q4_0 matrices and ``plain`` bytes of Q8_0 ones."""
    return _info(_tensor("blk.0.ffn_up.weight", "Q4_0", repacked), _tensor("blk.0.ffn_down.weight", "Q8_0", plain))


X86 = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})


# ------------------------------------------------------------------------------- load_with_mmap


@pytest.mark.parametrize(
    ("repacked", "plain", "mapped"),
    [
        (0, 100, True),
        (49, 51, True),
        (50, 50, True),  # half is not "most": mapped pages stay shared and reclaimable
        (51, 49, False),
        (100, 0, False),
    ],
)
def test_mmap_is_off_only_when_most_weight_bytes_are_repacked(repacked: int, plain: int, mapped: bool) -> None:
    """load_with_mmap: False when more than half of the weight bytes would be repacked."""
    assert load_with_mmap(_mixed(repacked * MiB, plain * MiB), X86) is mapped


def test_mmap_ignores_tensors_that_are_never_repacked() -> None:
    """token_embd (row lookups) and 1-D tensors of a repacked type do not count as repacked."""
    info = _info(
        _tensor("token_embd.weight", "Q4_0", 80 * MiB),
        _tensor("blk.0.attn_norm.weight", "Q4_0", 5 * MiB, dims=(256,)),
        _tensor("blk.0.ffn_up.weight", "Q4_0", 15 * MiB),
    )
    assert repacked_bytes(info, X86) == 15 * MiB
    assert load_with_mmap(info, X86) is True
    assert load_with_mmap(info, frozenset()) is True


def test_estimate_counts_repacked_weights_once_without_mmap() -> None:
    """Without mmap the repacked copy is the only copy: the estimate drops the repacked bytes, less the
    staging buffer llama.cpp reads them through (as large as the largest repacked tensor)."""
    info = _info(*(_tensor(f"blk.{i}.ffn_up.weight", "Q4_0", 10 * MiB) for i in range(6)),
                 _tensor("blk.0.ffn_down.weight", "Q8_0", 40 * MiB))
    mapped = estimate_memory(info, 2048, use_mmap=True, repack_types=X86)
    read = estimate_memory(info, 2048, use_mmap=False, repack_types=X86)
    assert mapped.repacked_bytes == 60 * MiB and read.repacked_bytes == 0
    assert read.runtime_overhead_bytes - mapped.runtime_overhead_bytes == 10 * MiB
    assert mapped.estimate_bytes - read.estimate_bytes == 50 * MiB
    assert mapped.weights_bytes == read.weights_bytes == 100 * MiB


@pytest.mark.parametrize(("repacked", "plain"), [(60, 40), (40, 60)])
def test_estimate_follows_load_with_mmap_by_default(repacked: int, plain: int) -> None:
    """use_mmap None is load_with_mmap's answer, for the same repack set."""
    info = _mixed(repacked * MiB, plain * MiB)
    est = estimate_memory(info, 2048, repack_types=X86)
    assert est.use_mmap is load_with_mmap(info, X86)
    assert est.repacked_bytes == (repacked * MiB if est.use_mmap else 0)


# ------------------------------------------------------------------------------- slots (n_seq)


@pytest.mark.parametrize(
    ("n_ctx", "n_seq", "cells"),
    [(512, 1, 512), (512, 4, 2048), (1000, 1, 1024), (1000, 3, 3072), (100, 3, 512), (2048, 4, 8192)],
)
def test_kv_cells_are_n_ctx_times_slots_padded_to_256(n_ctx: int, n_seq: int, cells: int) -> None:
    """One unified cache of pad256(n_ctx x n_seq) cells; KV bytes are linear in the cells."""
    info = _mixed(0, 10 * MiB)
    est = estimate_memory(info, n_ctx, n_seq=n_seq, repack_types=frozenset())
    assert est.n_ctx_alloc == est.kv_cells_full == cells
    assert est.kv_cache_bytes == 4 * cells * 2 * (64 + 64) * 2
    assert est.kv_per_slot_bytes == est.kv_cache_bytes // n_seq


def test_every_term_that_depends_on_slots_grows_with_them() -> None:
    """More slots: more KV, a larger attention span in the compute buffer, one logits row each; weights stay."""
    info = _mixed(0, 10 * MiB)
    ests = [estimate_memory(info, 1024, n_seq=n, repack_types=frozenset()) for n in range(1, 9)]
    for a, b in pairwise(ests):
        assert b.kv_cache_bytes > a.kv_cache_bytes
        assert b.compute_bytes > a.compute_bytes
        assert b.runtime_overhead_bytes > a.runtime_overhead_bytes
        assert b.weights_bytes == a.weights_bytes
        assert b.estimate_bytes > a.estimate_bytes


@pytest.mark.parametrize(
    ("n_ctx", "n_seq", "swa_cells"),
    [
        (2048, 1, 1024),  # min(2048, 512 + 512)
        (2048, 4, 2560),  # min(8192, 512 x 4 + 512)
        (512, 4, 2048),  # min(2048, 2560): the whole cache
        (8192, 2, 1536),
    ],
)
def test_sliding_window_cache_holds_every_slots_window(n_ctx: int, n_seq: int, swa_cells: int) -> None:
    """With a unified cache SWA layers get pad256(min(cells, window x n_seq + n_ubatch)) (llama-kv-cache-iswa.cpp)."""
    info = _info(_tensor("blk.0.ffn_up.weight", "Q8_0", MiB), swa=512)
    est = estimate_memory(info, n_ctx, n_seq=n_seq, repack_types=frozenset())
    assert est.kv_cells_swa == swa_cells
    cells = est.kv_cells_full
    assert est.kv_cache_bytes == (2 * swa_cells + 2 * cells) * 2 * 128 * 2
    full = estimate_memory(info, n_ctx, n_seq=n_seq, swa_full=True, repack_types=frozenset())
    assert full.kv_cells_swa == cells


def test_slots_and_context_must_be_positive() -> None:
    """n_ctx and n_seq below 1 are refused."""
    info = _mixed(0, MiB)
    with pytest.raises(ValueError, match="n_seq"):
        estimate_memory(info, 512, n_seq=0, repack_types=frozenset())
    with pytest.raises(ValueError, match="n_ctx"):
        estimate_memory(info, 0, repack_types=frozenset())


# ------------------------------------------------------------------------------- KV type


def test_q8_0_cache_turns_flash_attention_on_and_costs_less() -> None:
    """A q8_0 cache (34 bytes per 32 values) implies flash attention: no score matrix, less compute."""
    info = _mixed(0, 10 * MiB)
    f16 = estimate_memory(info, 2048, n_seq=2, repack_types=frozenset())
    q8 = estimate_memory(info, 2048, n_seq=2, kv_type="q8_0", repack_types=frozenset())
    assert (f16.flash_attn, q8.flash_attn) == (False, True)
    assert q8.kv_cache_bytes == int(f16.kv_cache_bytes * 34 / 64)
    assert q8.compute_bytes < f16.compute_bytes
    assert "flash attention" in "\n".join(q8.explain())


def test_unknown_kv_type_is_refused() -> None:
    """A KV type gguf does not know raises ValueError."""
    with pytest.raises(ValueError, match="KV cache type"):
        estimate_memory(_mixed(0, MiB), 512, kv_type="q3_x", repack_types=frozenset())


def test_explain_shows_slots_and_kv_per_slot() -> None:
    """explain() names the slots, tokens per slot and KV per slot, and whether the file is mapped."""
    est = estimate_memory(_mixed(60 * MiB, 40 * MiB), 2048, n_seq=4, repack_types=X86)
    text = "\n".join(est.explain())
    assert "4 slots x 2048 tokens" in text
    assert f"{est.kv_per_slot_bytes / MiB:.1f} MiB per slot" in text
    assert "without mmap" in text


# ------------------------------------------------------------------------------- repack sets by feature

ARM_DOTPROD_SET = frozenset({"IQ4_NL", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "MXFP4", "Q1_0"})


@pytest.mark.parametrize(
    ("machine", "features", "expected"),
    [
        # Pi 4 / Pi 3 / Zero 2 W (Cortex-A72/A53): NEON only, so only IQ4_NL is repacked
        ("aarch64", features_from_cpuinfo(PI4_CPUINFO), {"IQ4_NL"}),
        # the generic armv8-a wheel under qemu-user: the build has no dotprod whatever the CPU says
        ("aarch64", features_from_system_info(SYSINFO_ARM_GENERIC), {"IQ4_NL"}),
        # under qemu /proc/cpuinfo is the host's x86 one: no ARM feature, NEON is implied on aarch64
        ("aarch64", features_from_cpuinfo(X86_CPUINFO), {"IQ4_NL"}),
        ("aarch64", frozenset(), {"IQ4_NL"}),
        # Pi 5 / RK3588 (Cortex-A76): dotprod
        ("aarch64", features_from_cpuinfo(PI5_CPUINFO), ARM_DOTPROD_SET),
        ("arm64", features_from_system_info(SYSINFO_ARM_DOTPROD), ARM_DOTPROD_SET),
        ("aarch64", frozenset({"neon", "i8mm"}), ARM_DOTPROD_SET - {"MXFP4"}),
        ("aarch64", features_from_cpuinfo(GRAVITON3_CPUINFO), ARM_DOTPROD_SET),
        # x86-64: AVX2 as measured here; AVX-512 adds Q2_K
        ("x86_64", features_from_system_info(SYSINFO_X86), {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}),
        ("AMD64", features_from_cpuinfo(X86_CPUINFO), {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K"}),
        ("x86_64", frozenset(), set()),
        # ARM features on an x86 name (or another architecture) change nothing
        ("x86_64", frozenset({"neon", "dotprod"}), set()),
        ("riscv64", frozenset({"avx2", "dotprod"}), set()),
    ],
)
def test_repack_set_follows_the_features_not_the_architecture_name(
    machine: str, features: frozenset[str], expected: set[str]
) -> None:
    """repack_types_for mirrors ggml-cpu's repack choice: by the build's/CPU's features."""
    assert repack_types_for(machine, features) == expected


def test_a_pi4_q8_0_model_is_not_charged_twice() -> None:
    """On a Pi 4 (no dotprod) Q8_0 is not repacked: mapped, and no second copy in the estimate."""
    info = _mixed(0, 100 * MiB)
    pi4 = repack_types_for("aarch64", features_from_cpuinfo(PI4_CPUINFO))
    est = estimate_memory(info, 2048, repack_types=pi4)
    assert est.use_mmap is True and est.repacked_bytes == 0
    pi5 = repack_types_for("aarch64", features_from_cpuinfo(PI5_CPUINFO))
    assert load_with_mmap(info, pi5) is False  # all of it repacked on a Pi 5: read once, not mapped
    assert estimate_memory(info, 2048, repack_types=pi5).repacked_bytes == 0


def test_default_repack_set_by_architecture_name_assumes_the_superset() -> None:
    """Planning for another board by name alone: aarch64 assumes dotprod/i8mm (over- not under-estimates)."""
    assert default_repack_types("aarch64") == ARM_DOTPROD_SET
    assert default_repack_types("x86_64") == {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
    assert default_repack_types("aarch64", frozenset({"neon"})) == {"IQ4_NL"}
    assert default_repack_types("mips") == frozenset()
