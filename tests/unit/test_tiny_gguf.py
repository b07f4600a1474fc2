"""The tiny GGUF generator writes small, deterministic LLaMA files that llama.cpp loads and runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import pytest

from tests.support.tiny_gguf import (
    BOS_ID,
    CHATML,
    EOS_ID,
    FIRST_BYTE_ID,
    MIN_VOCAB_SIZE,
    TENSOR_TYPES,
    tiny_model_set,
    write_tiny_gemma3,
    write_tiny_llama,
)


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    assert field is not None, f"missing GGUF key {key}"
    return field.contents()


class TestFileContents:
    """What the generator writes, read back with gguf's own reader."""

    @pytest.mark.parametrize("tensor_type", TENSOR_TYPES)
    def test_file_is_small_and_quick_to_write(self, tmp_path: Path, tensor_type: str) -> None:
        """Every tensor type writes in well under a second into a file well under 5 MB."""
        start = time.perf_counter()
        path = write_tiny_llama(tmp_path / "m.gguf", tensor_type=tensor_type)
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0
        assert path.stat().st_size < 1_000_000

    def test_metadata_describes_a_gqa_llama(self, tmp_path: Path) -> None:
        """The header carries the llama hyper-parameters, including fewer KV heads than query heads."""
        path = write_tiny_llama(tmp_path / "m.gguf", n_layer=3, n_embd=128, n_head=8, n_head_kv=2, context_length=512)
        reader = gguf.GGUFReader(path)
        assert _field(reader, "general.architecture") == "llama"
        assert _field(reader, "general.name") == "tiny-llama"
        assert _field(reader, "llama.block_count") == 3
        assert _field(reader, "llama.embedding_length") == 128
        assert _field(reader, "llama.attention.head_count") == 8
        assert _field(reader, "llama.attention.head_count_kv") == 2
        assert _field(reader, "llama.context_length") == 512
        assert _field(reader, "llama.rope.dimension_count") == 16

    @pytest.mark.parametrize(
        ("tensor_type", "file_type"),
        [("F32", 0), ("F16", 1), ("Q8_0", 7), ("Q4_0", 2)],
    )
    def test_matrices_use_the_requested_type_and_norms_stay_f32(
        self, tmp_path: Path, tensor_type: str, file_type: int
    ) -> None:
        """2-D weights are stored in the requested type, 1-D norms in F32, and general.file_type agrees."""
        reader = gguf.GGUFReader(write_tiny_llama(tmp_path / "m.gguf", tensor_type=tensor_type))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_k.weight"] == tensor_type
        assert types["blk.1.ffn_down.weight"] == tensor_type
        assert types["output.weight"] == tensor_type
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["output_norm.weight"] == "F32"
        assert _field(reader, "general.file_type") == file_type

    def test_rows_that_are_not_whole_quant_blocks_stay_f32(self, tmp_path: Path) -> None:
        """A matrix whose row length is not a multiple of 32 falls back to F32 instead of failing."""
        path = write_tiny_llama(tmp_path / "m.gguf", tensor_type="Q4_0", n_embd=64, n_ff=80, n_head=4)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert types["blk.0.ffn_down.weight"] == "F32"  # rows of n_ff=80 values
        assert types["blk.0.ffn_up.weight"] == "Q4_0"  # rows of n_embd=64 values

    def test_vocabulary_has_specials_and_all_byte_tokens(self, tmp_path: Path) -> None:
        """The SentencePiece vocabulary holds BOS/EOS ids and the 256 byte-fallback tokens."""
        reader = gguf.GGUFReader(write_tiny_llama(tmp_path / "m.gguf", vocab_size=400))
        tokens = _field(reader, "tokenizer.ggml.tokens")
        assert _field(reader, "tokenizer.ggml.model") == "llama"
        assert len(tokens) == 400
        assert _field(reader, "tokenizer.ggml.bos_token_id") == BOS_ID
        assert _field(reader, "tokenizer.ggml.eos_token_id") == EOS_ID
        assert tokens[BOS_ID] == "<s>"
        assert tokens[EOS_ID] == "</s>"
        assert tokens[FIRST_BYTE_ID : FIRST_BYTE_ID + 256] == [f"<0x{b:02X}>" for b in range(256)]
        assert len(set(tokens)) == len(tokens)

    def test_chat_template_is_written_by_default(self, tmp_path: Path) -> None:
        """By default the file carries the ChatML template."""
        reader = gguf.GGUFReader(write_tiny_llama(tmp_path / "m.gguf"))
        assert _field(reader, "tokenizer.chat_template") == CHATML

    def test_no_chat_template_when_none(self, tmp_path: Path) -> None:
        """chat_template=None writes a model without any chat template key."""
        reader = gguf.GGUFReader(write_tiny_llama(tmp_path / "m.gguf", chat_template=None))
        assert reader.get_field("tokenizer.chat_template") is None

    def test_same_seed_gives_identical_bytes(self, tmp_path: Path) -> None:
        """Two files written with the same arguments are byte-for-byte identical."""
        first = write_tiny_llama(tmp_path / "a.gguf", tensor_type="Q4_0", seed=7)
        second = write_tiny_llama(tmp_path / "b.gguf", tensor_type="Q4_0", seed=7)
        assert first.read_bytes() == second.read_bytes()

    def test_different_seed_gives_different_weights(self, tmp_path: Path) -> None:
        """Changing the seed changes the weights."""
        first = write_tiny_llama(tmp_path / "a.gguf", seed=1)
        second = write_tiny_llama(tmp_path / "b.gguf", seed=2)
        assert first.read_bytes() != second.read_bytes()

    def test_model_set_has_one_file_per_type(self, tmp_path: Path) -> None:
        """tiny_model_set writes one readable file for each supported tensor type."""
        paths = tiny_model_set(tmp_path / "models")
        assert sorted(paths) == sorted(TENSOR_TYPES)
        for tensor_type, path in paths.items():
            types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
            assert types["output.weight"] == tensor_type

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"tensor_type": "Q5_K"},
            {"n_embd": 64, "n_head": 3},
            {"n_head": 4, "n_head_kv": 3},
            {"vocab_size": MIN_VOCAB_SIZE - 1},
        ],
    )
    def test_impossible_shapes_are_rejected(self, tmp_path: Path, kwargs: dict[str, Any]) -> None:
        """Arguments llama.cpp could not load are refused up front with ValueError."""
        with pytest.raises(ValueError, match="must"):
            write_tiny_llama(tmp_path / "m.gguf", **kwargs)


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_model_set(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(params=TENSOR_TYPES)
def llm(request: pytest.FixtureRequest, model_paths: dict[str, Path]) -> Iterator[Any]:
    import llama_cpp  # only the slow tests need the compiled library

    model = llama_cpp.Llama(model_path=str(model_paths[request.param]), n_ctx=256, n_threads=2, verbose=False)
    try:
        yield model
    finally:
        model.close()


@pytest.mark.slow
class TestLlamaCppRuns:
    """llama-cpp-python loads every tensor type and generates from it."""

    def test_greedy_completion_has_exactly_max_tokens(self, llm: Any) -> None:
        """A greedy completion never stops early: 16 requested tokens give 16 tokens of text."""
        result = llm.create_completion("Hello, tiny model", max_tokens=16, temperature=0)
        choice = result["choices"][0]
        assert result["usage"]["completion_tokens"] == 16
        assert choice["finish_reason"] == "length"
        assert choice["text"].strip()

    def test_sampled_completion_also_has_exactly_max_tokens(self, llm: Any) -> None:
        """With sampling at a high temperature the end-of-generation token is still never chosen."""
        result = llm.create_completion("Once", max_tokens=24, temperature=1.5, seed=3)
        assert result["usage"]["completion_tokens"] == 24
        assert result["choices"][0]["finish_reason"] == "length"

    def test_streaming_yields_the_same_text_as_one_shot(self, llm: Any) -> None:
        """Streamed chunks concatenate to the greedy one-shot text, one chunk per token."""
        whole = llm.create_completion("stream me", max_tokens=16, temperature=0)["choices"][0]["text"]
        chunks = [
            c["choices"][0]["text"]
            for c in llm.create_completion("stream me", max_tokens=16, temperature=0, stream=True)
        ]
        assert "".join(chunks) == whole
        assert len([c for c in chunks if c]) == 16

    def test_chat_completion_uses_the_template(self, llm: Any) -> None:
        """create_chat_completion renders ChatML and returns an assistant reply of max_tokens tokens."""
        messages = [
            {"role": "system", "content": "You are tiny."},
            {"role": "user", "content": "Say something."},
        ]
        result = llm.create_chat_completion(messages=messages, max_tokens=12, temperature=0)
        message = result["choices"][0]["message"]
        assert message["role"] == "assistant"
        assert message["content"]
        assert result["usage"]["completion_tokens"] == 12
        assert llm.metadata["tokenizer.chat_template"] == CHATML

    @pytest.mark.parametrize("text", ["plain ascii", "naïve café", "日本語のテキスト", "emoji 🦙🔥", "tab\tnew\nline"])
    def test_any_utf8_text_round_trips_through_the_tokenizer(self, llm: Any, text: str) -> None:
        """Any UTF-8 prompt tokenizes (bytes as fallback) and detokenizes back to the same text."""
        tokens = llm.tokenize(text.encode(), add_bos=False)
        assert tokens
        assert llm.detokenize(tokens).decode() == text

    def test_prompt_starts_with_bos(self, llm: Any) -> None:
        """Tokenizing a prompt prepends the BOS token like a real LLaMA vocabulary."""
        assert llm.tokenize(b"hi")[0] == BOS_ID
        assert llm.token_bos() == BOS_ID
        assert llm.token_eos() == EOS_ID


@pytest.mark.slow
def test_model_without_template_still_loads(tmp_path: Path) -> None:
    """A model written with chat_template=None loads and has no template in its metadata."""
    import llama_cpp  # only the slow tests need the compiled library

    path = write_tiny_llama(tmp_path / "plain.gguf", chat_template=None)
    model = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        assert "tokenizer.chat_template" not in model.metadata
        result = model.create_completion("x", max_tokens=4, temperature=0)
        assert result["usage"]["completion_tokens"] == 4
    finally:
        model.close()


class TestTinyGemma3:
    """write_tiny_gemma3: the same tiny recipe as a Gemma 3 with a sliding window."""

    def test_metadata_describes_a_sliding_window_gemma3(self, tmp_path: Path) -> None:
        """The header names the gemma3 architecture, its window, and the QK and post norms per layer."""
        path = write_tiny_gemma3(tmp_path / "g.gguf", tensor_type="Q8_0", sliding_window=24)
        reader = gguf.GGUFReader(path)
        assert _field(reader, "general.architecture") == "gemma3"
        assert _field(reader, "gemma3.attention.sliding_window") == 24
        assert _field(reader, "gemma3.block_count") == 6
        names = {t.name for t in reader.tensors}
        for norm in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"):
            assert f"blk.5.{norm}.weight" in names
        assert path.stat().st_size < 1_000_000

    def test_impossible_window_is_rejected(self, tmp_path: Path) -> None:
        """A negative window is refused up front with ValueError."""
        with pytest.raises(ValueError, match="must"):
            write_tiny_gemma3(tmp_path / "g.gguf", sliding_window=-1)

    @pytest.mark.slow
    @pytest.mark.parametrize("tensor_type", TENSOR_TYPES)
    def test_llama_cpp_runs_it_with_a_sliding_window(self, tmp_path: Path, tensor_type: str) -> None:
        """llama.cpp loads it with the requested window and a greedy completion has exactly max_tokens tokens."""
        import llama_cpp  # only the slow tests need the compiled library

        path = write_tiny_gemma3(tmp_path / "g.gguf", tensor_type=tensor_type, sliding_window=16)
        model = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
        try:
            assert llama_cpp.llama_model_n_swa(model.model) == 16
            result = model.create_completion("Hello, tiny gemma, how are you today?", max_tokens=40, temperature=0)
            assert result["usage"]["completion_tokens"] == 40
            assert result["choices"][0]["finish_reason"] == "length"
        finally:
            model.close()
