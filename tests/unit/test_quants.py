"""The quant ladder and reading quant tags from real Hub file names."""

from __future__ import annotations

import pytest

from agent.catalog.quants import (
    LADDER,
    at_least,
    is_weights_file,
    normalize_tag,
    parse_quant_tag,
    quality_rank,
    split_part,
)

HUB_NAMES = [
    ("gemma-3-270m-it-Q8_0.gguf", "Q8_0"),
    ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
    ("Llama-3.2-1B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
    ("Llama-3.2-1B-Instruct-f16.gguf", "F16"),
    ("Llama-3.2-1B-Instruct-Q6_K_L.gguf", "Q6_K_L"),
    ("Llama-3.2-1B-Instruct-Q3_K_XL.gguf", "Q3_K_XL"),
    ("gemma-3-1b-it-BF16.gguf", "BF16"),
    ("gemma-3-1b-it-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
    ("gemma-3-1b-it-UD-IQ2_XXS.gguf", "UD-IQ2_XXS"),
    ("gemma-3-1b-it-Q2_K_L.gguf", "Q2_K_L"),
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
    ("SmolLM2-135M-Instruct.Q3_K_S.gguf", "Q3_K_S"),
    ("smollm2-360m-instruct-q8_0.gguf", "Q8_0"),
    ("Phi-3-mini-4k-instruct-fp16.gguf", "F16"),
    ("Qwen2-0.5B-Instruct.Q4_K.gguf", "Q4_K_M"),
    ("Qwen2.5-7B-Instruct-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"),
    ("gemma-3-27b-it-f16-00002-of-00002.gguf", "F16"),
    ("Q4_K_M/Model-Q4_K_M-00001-of-00003.gguf", "Q4_K_M"),
    ("Qwen2-0.5B-Instruct.Q4_K_M.iMatrix.gguf", "Q4_K_M"),
    ("Qwen2.5-0.5B-Instruct-f32.gguf", "F32"),
    ("model-TQ1_0.gguf", "TQ1_0"),
]


@pytest.mark.parametrize(("filename", "tag"), HUB_NAMES)
def test_parses_quant_tags_from_hub_file_names(filename: str, tag: str) -> None:
    """Real Hub naming styles (dash, dot, lower case, UD-, _L/_XL, splits) give the canonical tag."""
    assert parse_quant_tag(filename) == tag


@pytest.mark.parametrize(
    "filename",
    [
        "Phi-3-mini-4k-instruct-q4.gguf",  # Microsoft's bare "q4": ambiguous, list it explicitly
        "README.md",
        "SmolLM2-1.7B-Instruct-Q4_0_8_8.gguf",  # removed ARM layout llama.cpp refuses to load
        "model.gguf",
        "Qwen2.5-0.5B-Instruct.gguf",
    ],
)
def test_names_without_a_loadable_tag_give_none(filename: str) -> None:
    """No tag, an ambiguous one or a layout llama.cpp no longer loads: None."""
    assert parse_quant_tag(filename) is None


@pytest.mark.parametrize(
    ("filename", "part"),
    [("a-Q8_0-00001-of-00002.gguf", (1, 2)), ("a-Q8_0-00002-of-00002.gguf", (2, 2)), ("a-Q8_0.gguf", None)],
)
def test_split_parts_are_recognized(filename: str, part: tuple[int, int] | None) -> None:
    """llama.cpp split files carry part and total in the name."""
    assert split_part(filename) == part


@pytest.mark.parametrize(
    ("filename", "weights"),
    [
        ("gemma-3-4b-it-Q4_K_M.gguf", True),
        ("mmproj-F16.gguf", False),
        ("gemma-3-27b-it.mmproj-Q8_0.gguf", False),
        ("imatrix_unsloth.gguf", False),
        ("config.json", False),
    ],
)
def test_projectors_and_imatrix_are_not_weights(filename: str, weights: bool) -> None:
    """Vision projectors and importance matrices in GGUF repos are not candidates."""
    assert is_weights_file(filename) is weights


def test_ladder_is_ordered_best_first() -> None:
    """The documented order holds: F16 > BF16 > Q8_0 > Q6_K > Q5_K_M > ... > Q2_K > IQ2_XXS."""
    order = ["F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0",
             "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ2_M", "IQ2_XS", "IQ2_XXS", "IQ1_S"]
    ranks = [quality_rank(t) for t in order]
    assert ranks == sorted(ranks)
    assert len({q.tag for q in LADDER}) == len(LADDER)


def test_dynamic_and_large_variants_rank_just_above_their_base() -> None:
    """UD-Q4_K_XL and Q4_K_L sit above Q4_K_M and below Q5_K_S."""
    assert quality_rank("Q5_K_S") < quality_rank("UD-Q4_K_XL") < quality_rank("Q4_K_M")  # type: ignore[operator]
    assert quality_rank("Q4_K_L") < quality_rank("Q4_K_M")  # type: ignore[operator]
    assert quality_rank("UD-Q4_K_M") == quality_rank("Q4_K_M") - 1  # type: ignore[operator]


@pytest.mark.parametrize(
    ("text", "tag"),
    [("q4_k_m", "Q4_K_M"), ("fp16", "F16"), ("ud-q4_k_xl", "UD-Q4_K_XL"), ("Q4_K", "Q4_K_M"), ("Q9_9", None)],
)
def test_normalize_tag(text: str, tag: str | None) -> None:
    """Spellings map to one canonical tag; unknown ones to None."""
    assert normalize_tag(text) == tag


def test_at_least_compares_against_the_floor() -> None:
    """Q3_K_M passes a Q3_K_S floor, IQ3_XXS and unknown tags do not; an unknown floor is an error."""
    assert at_least("Q3_K_M", "Q3_K_S")
    assert at_least("Q3_K_S", "Q3_K_S")
    assert not at_least("IQ3_XXS", "Q3_K_S")
    assert not at_least("Q9_9", "Q3_K_S")
    with pytest.raises(ValueError, match="quality floor"):
        at_least("Q4_0", "Q9_9")
