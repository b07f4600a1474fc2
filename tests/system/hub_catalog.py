"""What the fake Hub serves to devices: tiny random GGUFs under real entries of the shipped models.toml.

Devices are configured with real catalog names (``smollm2-135m-instruct``) and resolve the real repo
and file names; only the bytes are tiny, and the Hub is a loopback server on the host. Quants the
catalog lists but the fake repo lacks are skipped by the planner (``plan_header_unavailable``).
"""

from __future__ import annotations

from pathlib import Path

SMOLLM_135M = ("mradermacher/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q8_0.gguf")
SMOLLM_360M = ("HuggingFaceTB/SmolLM2-360M-Instruct-GGUF", "smollm2-360m-instruct-q8_0.gguf")


def tiny_model(path: Path, *, big: bool = False, seed: int = 0, name: str = "tiny") -> Path:
    """A tiny random Q8_0 GGUF; ``big`` makes one of ~4 MB, so a throttled pull takes seconds."""
    from tests.support.tiny_gguf import write_tiny_llama

    if big:
        return write_tiny_llama(path, tensor_type="Q8_0", seed=seed, name=name, n_embd=256, n_layer=3, n_ff=1024)
    return write_tiny_llama(path, tensor_type="Q8_0", seed=seed, name=name)
