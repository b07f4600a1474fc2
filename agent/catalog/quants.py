"""The quant ladder: which GGUF quantizations exist, how they rank, and how to read them from file names.

Quality order follows llama.cpp's ``quantize`` guidance (perplexity growth per bit saved): each rung is
smaller and, on the whole, lower quality than the one above, so "the best quant that fits" is the first
rung, walking down, whose estimate fits. Unsloth's dynamic quants (``UD-`` prefix) keep sensitive layers
at higher precision, so each ranks just above its plain counterpart; bartowski's ``_L``/``_XL`` variants
(embeddings and output in Q8_0) rank just above the plain K-quant of the same size.

``bits_per_weight`` is the average for a typical 1-8B model (llama.cpp's quantize table); it sizes a
file roughly when its header has not been read. Real decisions use the header's tensor bytes.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple


class Quant(NamedTuple):
    """One rung of the ladder."""

    tag: str
    bits_per_weight: float
    note: str = ""


# Best first. Legacy Q4_1/Q5_1/IQ4_NL sit where their size puts them.
_BASE_LADDER: Final[tuple[Quant, ...]] = (
    Quant("F32", 32.0, "unquantized"),
    Quant("F16", 16.0, "unquantized half precision"),
    Quant("BF16", 16.0, "unquantized bfloat16"),
    Quant("Q8_K_XL", 9.0, "Q8_0 with some layers kept at F16/BF16"),
    Quant("Q8_0", 8.5, "practically lossless"),
    Quant("Q6_K_XL", 7.0),
    Quant("Q6_K_L", 6.8, "Q6_K with Q8_0 embeddings/output"),
    Quant("Q6_K", 6.56, "near lossless"),
    Quant("Q5_K_XL", 6.0),
    Quant("Q5_K_L", 5.9, "Q5_K_M with Q8_0 embeddings/output"),
    Quant("Q5_K_M", 5.69, "very low loss"),
    Quant("Q5_K_S", 5.54),
    Quant("Q5_1", 6.0, "legacy"),
    Quant("Q5_0", 5.5, "legacy"),
    Quant("Q4_K_XL", 5.1),
    Quant("Q4_K_L", 5.0, "Q4_K_M with Q8_0 embeddings/output"),
    Quant("Q4_K_M", 4.89, "the usual sweet spot"),
    Quant("Q4_K_S", 4.58),
    Quant("Q4_1", 5.0, "legacy"),
    Quant("IQ4_NL", 4.5),
    Quant("Q4_0", 4.5, "legacy; fast on ARM (runtime repack)"),
    Quant("IQ4_XS", 4.25),
    Quant("Q3_K_XL", 4.4),
    Quant("Q3_K_L", 4.27),
    Quant("Q3_K_M", 3.91, "noticeable loss"),
    Quant("IQ3_M", 3.66),
    Quant("Q3_K_S", 3.5),
    Quant("IQ3_S", 3.44),
    Quant("IQ3_XS", 3.3),
    Quant("IQ3_XXS", 3.06),
    Quant("Q2_K_XL", 3.2),
    Quant("Q2_K_L", 3.1, "Q2_K with Q8_0 embeddings/output"),
    Quant("Q2_K", 2.96, "large loss"),
    Quant("IQ2_M", 2.7),
    Quant("Q2_K_S", 2.6),
    Quant("IQ2_S", 2.5),
    Quant("IQ2_XS", 2.31),
    Quant("IQ2_XXS", 2.06),
    Quant("TQ2_0", 2.06, "ternary models only"),
    Quant("IQ1_M", 1.75, "extreme loss"),
    Quant("TQ1_0", 1.69, "ternary models only"),
    Quant("IQ1_S", 1.56, "extreme loss"),
)

UD_PREFIX: Final[str] = "UD-"


def _with_dynamic_variants(base: tuple[Quant, ...]) -> tuple[Quant, ...]:
    ladder: list[Quant] = []
    for q in base:
        if q.tag not in ("F32", "F16", "BF16"):
            ladder.append(Quant(UD_PREFIX + q.tag, q.bits_per_weight + 0.1, "Unsloth dynamic " + q.tag))
        ladder.append(q)
    return tuple(ladder)


#: Every known quant, best quality first.
LADDER: Final[tuple[Quant, ...]] = _with_dynamic_variants(_BASE_LADDER)
_RANK: Final[dict[str, int]] = {q.tag: i for i, q in enumerate(LADDER)}

#: Spellings seen on the Hub that mean a ladder tag.
_ALIASES: Final[dict[str, str]] = {
    "FP32": "F32",
    "FP16": "F16",
    "Q4_K": "Q4_K_M",  # llama.cpp's quantize treats the bare K names as the _M mix
    "Q3_K": "Q3_K_M",
    "Q5_K": "Q5_K_M",
}
# Names that look like quants but llama.cpp no longer loads (repacked at runtime from Q4_0 now).
_UNLOADABLE: Final[tuple[str, ...]] = ("Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8")

_ALL_SPELLINGS: Final[tuple[str, ...]] = tuple(
    sorted({*(q.tag for q in _BASE_LADDER), *_ALIASES, *_UNLOADABLE}, key=len, reverse=True)
)
# A tag is a whole token: not glued to letters or digits on either side ("Q8_0", not "XQ8_0x").
_TAG_RE: Final[re.Pattern[str]] = re.compile(
    r"(?<![A-Za-z0-9])(?P<ud>UD-)?(?P<tag>" + "|".join(map(re.escape, _ALL_SPELLINGS)) + r")(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_SPLIT_RE: Final[re.Pattern[str]] = re.compile(r"-(\d{5})-of-(\d{5})(?=\.gguf$)", re.IGNORECASE)
# Files in GGUF repos that are not the language model itself.
_NOT_WEIGHTS_RE: Final[re.Pattern[str]] = re.compile(r"(^|[/_.-])(mmproj|imatrix)", re.IGNORECASE)


def normalize_tag(text: str) -> str | None:
    """The canonical ladder tag for a spelling such as ``q4_k_m``, ``fp16`` or ``ud-q4_k_xl``; else None."""
    upper = text.strip().upper()
    ud = upper.startswith(UD_PREFIX)
    core = upper.removeprefix(UD_PREFIX)
    core = _ALIASES.get(core, core)
    tag = UD_PREFIX + core if ud else core
    return tag if tag in _RANK else None


def quality_rank(tag: str) -> int | None:
    """Position on the ladder, 0 = best; None for tags the ladder does not know."""
    canonical = normalize_tag(tag)
    return None if canonical is None else _RANK[canonical]


def at_least(tag: str, floor: str) -> bool:
    """Whether ``tag`` is of the same or better quality than ``floor`` (unknown tags are not)."""
    rank, floor_rank = quality_rank(tag), quality_rank(floor)
    if floor_rank is None:
        raise ValueError(f"unknown quant {floor!r} as quality floor")
    return rank is not None and rank <= floor_rank


def split_part(filename: str) -> tuple[int, int] | None:
    """``(part, total)`` for split GGUF files such as ``...-00001-of-00003.gguf``; None otherwise."""
    m = _SPLIT_RE.search(filename.rsplit("/", 1)[-1])
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_weights_file(filename: str) -> bool:
    """A GGUF holding a language model (not a vision projector or an importance matrix)."""
    base = filename.rsplit("/", 1)[-1]
    return base.lower().endswith(".gguf") and not _NOT_WEIGHTS_RE.search(base)


def parse_quant_tag(filename: str) -> str | None:
    """The canonical quant tag in a Hub file name, e.g. ``'Q4_K_M'`` for ``qwen2.5-0.5b-instruct-q4_k_m.gguf``.

    Directory parts and the split suffix (``-00001-of-00002``) are ignored; when several tags appear,
    the last one wins (quant tags end file names). Returns None when no known tag is present, and for
    the removed ``Q4_0_4_4``-style ARM layouts, which current llama.cpp refuses to load.
    """
    base = filename.rsplit("/", 1)[-1]
    base = _SPLIT_RE.sub("", base)
    matches = list(_TAG_RE.finditer(base))
    if not matches:
        return None
    last = matches[-1]
    if last.group("tag").upper() in _UNLOADABLE:
        return None
    return normalize_tag((last.group("ud") or "") + last.group("tag"))
