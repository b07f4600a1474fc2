"""CPU features in one vocabulary, from /proc/cpuinfo and from llama.cpp's system info (agent.hardware)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.hardware.cpu_features import features_from_cpuinfo, features_from_system_info
from agent.hardware.probe import read_cpu_features

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sys"

PI4_CPUINFO = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n"
PI5_CPUINFO = (
    "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
    "asimdrdm lrcpc dcpop asimddp\nCPU part\t: 0xd0b\n"
)
GRAVITON3_CPUINFO = (
    "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
    "jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp "
    "svei8mm svebf16 i8mm bf16 dgh rng\n"
)
X86_CPUINFO = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae lm avx avx2 fma avx512f avx512bw\n"
X86_AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu vme lm avx avx2 fma\n"
# llama_print_system_info() of real builds
SYSINFO_X86 = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
SYSINFO_ARM_GENERIC = "CPU : NEON = 1 | ARM_FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
SYSINFO_ARM_DOTPROD = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | REPACK = 1 | "
SYSINFO_ARM_I8MM = "CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | SVE = 1 | MATMUL_INT8 = 1 | SVE_CNT = 16 | "


@pytest.mark.parametrize(
    ("text", "features"),
    [
        (PI4_CPUINFO, {"neon"}),
        (PI5_CPUINFO, {"neon", "dotprod"}),
        (GRAVITON3_CPUINFO, {"neon", "dotprod", "sve", "i8mm"}),
        (X86_CPUINFO, {"avx2", "avx512"}),
        (X86_AVX2_CPUINFO, {"avx2"}),
        ("", set()),
        ("processor\t: 0\nmodel name\t: something\n", set()),
    ],
)
def test_features_from_cpuinfo(text: str, features: set[str]) -> None:
    """/proc/cpuinfo's ARM Features or x86 flags map onto one vocabulary (svei8mm is not i8mm's name)."""
    assert features_from_cpuinfo(text) == features


@pytest.mark.parametrize(
    ("text", "features"),
    [
        (SYSINFO_X86, {"avx2"}),
        (SYSINFO_ARM_GENERIC, {"neon"}),
        (SYSINFO_ARM_DOTPROD, {"neon", "dotprod"}),
        (SYSINFO_ARM_I8MM, {"neon", "dotprod", "sve", "i8mm"}),
        ("CPU : AVX2 = 0 | NEON = 0 | ", set()),
        ("", set()),
    ],
)
def test_features_from_llama_system_info(text: str, features: set[str]) -> None:
    """llama_print_system_info()'s NAME = 1 pairs map onto the same vocabulary; = 0 means absent."""
    assert features_from_system_info(text) == features


@pytest.mark.parametrize(
    ("board", "features"),
    [
        ("pi4-2gb", {"neon"}),
        ("pi-zero-2w", {"neon"}),
        ("pi5-8gb", {"neon", "dotprod"}),
        ("laptop-battery", {"avx2"}),
    ],
)
def test_read_cpu_features_from_a_proc_tree(board: str, features: set[str]) -> None:
    """The probe reads the features from <proc_root>/cpuinfo."""
    assert read_cpu_features(FIXTURES / board / "proc") == features


def test_read_cpu_features_without_cpuinfo_is_empty(tmp_path: Path) -> None:
    """No cpuinfo (a chroot without /proc): no features, no error."""
    assert read_cpu_features(tmp_path) == frozenset()
