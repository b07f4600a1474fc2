"""The memory estimate against what llama.cpp really adds to a process (measured RSS)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from agent.catalog.estimate import estimate_memory
from agent.catalog.gguf_header import read_local
from tests.support.rss_probe import measure
from tests.support.tiny_gguf import write_tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Big enough that llama.cpp's fixed costs do not dominate (a few MiB), small enough to write in a second.
_SHAPE = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_head_kv": 2, "n_ff": 512, "vocab_size": 2048}


NOISE_BYTES = int(1.5 * 2**20)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model per tensor type (F32 and F16 weights, Q8_0, and repacked Q4_0)."""
    directory = tmp_path_factory.mktemp("estimate")
    return {
        t: write_tiny_llama(directory / f"tiny-{t}.gguf", tensor_type=t, **_SHAPE)  # type: ignore[arg-type]
        for t in ("F32", "F16", "Q8_0", "Q4_0")
    }


@pytest.mark.parametrize("n_ctx", [512, 2048])
@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0", "Q4_0"])
def test_estimate_is_within_5_percent_and_never_2_percent_under(
    models: dict[str, Path], tensor_type: str, n_ctx: int
) -> None:
    """Loading, filling the context and generating adds within -2 %..+5 % of the estimate.

    Tolerance for these 20-50 MiB models: an under-estimate of up to NOISE_BYTES also passes. The peak
    RSS also holds whatever Python does while llama-cpp-python loads (0.9 MiB more, every time, with
    PYTHONDONTWRITEBYTECODE=1: modules compiled without .pyc caches), 2-5 % here but nothing at the
    real models' sizes, whose error bench/estimate_accuracy.py reports (Gemma 3 270M: within +-0.5 %).
    """
    path = models[tensor_type]
    estimate = estimate_memory(read_local(path), n_ctx).estimate_bytes
    measured = measure(path, n_ctx, timeout=240)["increase"]
    error = (estimate - measured) / measured
    under_within_noise = measured - estimate <= NOISE_BYTES
    assert (error >= -0.02 or under_within_noise) and error <= 0.05, (
        f"{tensor_type} n_ctx={n_ctx}: estimate {estimate / 2**20:.2f} MiB vs measured "
        f"{measured / 2**20:.2f} MiB ({error:+.2%})"
    )
