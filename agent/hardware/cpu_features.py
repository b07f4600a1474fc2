"""Which SIMD features a CPU (or a llama.cpp build) has, in one small vocabulary.

The memory estimate needs to know which weight types llama.cpp's CPU backend repacks, and that depends
on features such as ARM dotprod and int8 matrix multiply, not on the architecture name (a Pi 4's
Cortex-A72 has neither, a Pi 5's A76 has dotprod). Two sources name them differently; both are parsed
here into the same names (:data:`FEATURES`):

* ``/proc/cpuinfo``: x86 ``flags`` (``avx2``, ``avx512f``), ARM ``Features`` (``asimd``, ``asimddp``,
  ``i8mm``, ``sve``). A native build (the default on a board) follows its CPU.
* ``llama_print_system_info()`` of the loaded library (``AVX2 = 1``, ``NEON = 1``, ``DOTPROD = 1``,
  ``MATMUL_INT8 = 1``, ``SVE = 1``): what the build was compiled for, which is what counts (under
  qemu-user, for instance, the emulated CPU offers dotprod but a generic armv8-a build does not use it).

Pure parsers; the probe (:func:`agent.hardware.probe.read_cpu_features`) reads the file.
"""

from __future__ import annotations

import re
from typing import Final

#: The feature names used everywhere in the agent.
FEATURES: Final[frozenset[str]] = frozenset({"avx2", "avx512", "neon", "dotprod", "i8mm", "sve"})

_CPUINFO: Final[dict[str, str]] = {
    # x86 "flags"
    "avx2": "avx2",
    "avx512f": "avx512",
    # ARM "Features"
    "asimd": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
}
_SYSTEM_INFO: Final[dict[str, str]] = {
    "AVX2": "avx2",
    "AVX512": "avx512",
    "NEON": "neon",
    "DOTPROD": "dotprod",
    "MATMUL_INT8": "i8mm",
    "SVE": "sve",
}
_SYSTEM_INFO_RE: Final[re.Pattern[str]] = re.compile(r"([A-Z0-9_]+)\s*=\s*(\d+)")


def features_from_cpuinfo(text: str) -> frozenset[str]:
    """Features of the first processor in ``/proc/cpuinfo`` text (x86 ``flags`` or ARM ``Features``)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(_CPUINFO[f] for f in value.split() if f in _CPUINFO)
    return frozenset()


def features_from_system_info(text: str) -> frozenset[str]:
    """Features a llama.cpp build reports in ``llama_print_system_info()`` (``NAME = 1`` pairs)."""
    return frozenset(
        _SYSTEM_INFO[name] for name, value in _SYSTEM_INFO_RE.findall(text) if name in _SYSTEM_INFO and value != "0"
    )
