"""The memory estimate against what llama.cpp really adds to a process (measured RSS)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from agent.catalog.estimate import estimate_memory
from agent.catalog.gguf_header import read_local
from bench.estimate_accuracy import measure
from tests.support.tiny_gguf import write_tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Big enough that llama.cpp's fixed costs do not dominate (a few MiB), small enough to write in a second.
_SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_head_kv": 2, "n_ff": 512, "vocab_size": 2048}


NOISE_BYTES = 2 * 2**20


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model per tensor type (F32 and F16 weights, Q8_0, and repacked Q4_0)."""
    directory = tmp_path_factory.mktemp("estimate")
    return {
        t: write_tiny_llama(directory / f"tiny-{t}.gguf", tensor_type=t, **_SHAPE)  # type: ignore[arg-type]
        for t in ("F32", "F16", "Q8_0", "Q4_0")
    }


@pytest.mark.parametrize(("n_ctx", "n_seq", "kv_type"), [(512, 1, "f16"), (2048, 1, "f16"), (512, 4, "f16"),
                                                          (512, 1, "q8_0")])
@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0", "Q4_0"])
def test_estimate_is_within_5_percent_and_never_2_percent_under(
    models: dict[str, Path], tensor_type: str, n_ctx: int, n_seq: int, kv_type: str
) -> None:
    """Loading as the engine does (mmap as load_with_mmap says, a unified cache of n_ctx x n_seq cells),
    filling every slot and decoding in all of them adds within -2 %..+5 % of the estimate.

    Tolerance for these 10-50 MiB models: an error of up to NOISE_BYTES either way also passes. The peak
    RSS also holds whatever Python does while llama-cpp-python loads (0.9 MiB more, every time, with
    PYTHONDONTWRITEBYTECODE=1: modules compiled without .pyc caches; less where the caches exist, as in a CI
    checkout, where the n_ctx 512 rows measured 1.3-1.5 MiB under the estimate: +6..+13 %), 2-13 % here but
    nothing at the real models' sizes, whose error bench/estimate_accuracy.py reports (SmolLM2, Gemma 3 270M:
    -0.2 %..+1.9 %).
    """
    path = models[tensor_type]
    est = estimate_memory(read_local(path), n_ctx, n_seq=n_seq, kv_type=kv_type)
    estimate = est.estimate_bytes
    cfg = {"n_ctx": n_ctx, "n_seq": n_seq, "kv_type": kv_type, "use_mmap": est.use_mmap}
    measured = measure(path, cfg, timeout=240)["increase"]
    error = (estimate - measured) / measured
    within_noise = abs(measured - estimate) <= NOISE_BYTES
    assert (error >= -0.02 and error <= 0.05) or within_noise, (
        f"{tensor_type} n_ctx={n_ctx} x{n_seq} {kv_type}: estimate {estimate / 2**20:.2f} MiB vs measured "
        f"{measured / 2**20:.2f} MiB ({error:+.2%})"
    )
