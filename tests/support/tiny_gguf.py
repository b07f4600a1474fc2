"""Tiny random-weight LLaMA GGUF files that llama.cpp really loads, written on the fly for tests.

Tests need real model files (loading, generation, streaming, chat templates, memory estimates) without
downloading anything. These files are a few hundred kilobytes, are written in milliseconds, and are
deterministic for a seed.

Design:

* Architecture ``llama`` with grouped-query attention (``n_head_kv < n_head``) so KV-cache estimates
  that depend on the KV head count can be checked against a real file.
* Tokenizer: a SentencePiece-style ("llama") vocabulary with ``<unk>``/``<s>``/``</s>``, the 256 byte
  fallback tokens ``<0x00>``..``<0xFF>``, the ChatML control tokens, then printable ASCII characters and
  frequent letter pairs. Any UTF-8 text tokenizes (unknown characters fall back to bytes), and
  detokenization gives text back.
* Exact-length replies: generation must never stop early, so tests can ask for N tokens and get N.
  Hidden dimension 0 of every token embedding is a constant that dominates the small random values
  and the small layer updates, so after the final RMSNorm it is a near-constant positive value; column 0
  of the output matrix therefore acts as a per-token logit bias.
  End-of-generation tokens, control tokens and byte tokens (which could form invalid UTF-8) get a large
  negative bias, printable tokens get none. Greedy and sampled replies are therefore plain ASCII text
  of exactly ``max_tokens`` tokens.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import gguf
import numpy as np

#: ChatML as used by Qwen/SmolLM chat models; rendered by llama-cpp-python's Jinja2 chat formatter.
CHATML: Final[str] = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TENSOR_TYPES: Final[tuple[str, ...]] = ("F32", "F16", "Q8_0", "Q4_0")

UNK_ID: Final[int] = 0
BOS_ID: Final[int] = 1
EOS_ID: Final[int] = 2
FIRST_BYTE_ID: Final[int] = 3
IM_START_ID: Final[int] = FIRST_BYTE_ID + 256
IM_END_ID: Final[int] = IM_START_ID + 1
FIRST_TEXT_ID: Final[int] = IM_END_ID + 1

# SentencePiece marks a space with U+2581 ("lower one eighth block").
_SPACE: Final[str] = "\u2581"
_PRINTABLE: Final[tuple[str, ...]] = tuple(_SPACE if ch == " " else ch for ch in string.printable if ch.isprintable())
MIN_VOCAB_SIZE: Final[int] = FIRST_TEXT_ID + len(_PRINTABLE)

_QTYPES: Final[dict[str, gguf.GGMLQuantizationType]] = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_0": gguf.GGMLQuantizationType.Q4_0,
}
_FILE_TYPES: Final[dict[str, gguf.LlamaFileType]] = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}

# Weight scales: small enough that activations stay tame in every layer, while the constant hidden
# dimension (see module docstring) dominates the residual stream.
_WEIGHT_STD: Final[float] = 0.02
_EMBED_STD: Final[float] = 0.1
_BIAS_DIM_VALUE: Final[float] = 1.0
_OUTPUT_STD: Final[float] = 0.5
# After the final norm the bias dimension is about sqrt(n_embd) * 0.8, so -8 gives logits around -50.
_BANNED_BIAS: Final[float] = -8.0


def _vocab(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Token texts, SentencePiece scores and token types for a vocabulary of exactly ``vocab_size``."""
    token_type = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [token_type.UNKNOWN, token_type.CONTROL, token_type.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [token_type.BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [token_type.CONTROL, token_type.CONTROL]
    text = list(_PRINTABLE)
    # Letter pairs (word starts first) are reachable by SentencePiece merges of single characters.
    letters = string.ascii_lowercase
    pairs = [_SPACE + a for a in letters] + [a + b for a in "etaoinshrd" for b in letters]
    for piece in pairs:
        if len(tokens) + len(text) >= vocab_size:
            break
        text.append(piece)
    # Pad an oversized request with unique three-letter pieces so every id is a real text token.
    i = 0
    while len(tokens) + len(text) < vocab_size:
        piece = letters[i // 676 % 26] + letters[i // 26 % 26] + letters[i % 26]
        if piece not in text:
            text.append(piece)
        i += 1
    tokens += text
    types += [token_type.NORMAL] * len(text)
    # Higher score merges first; single characters must exist, longer pieces are preferred merges.
    scores = [0.0] * FIRST_TEXT_ID + [-float(i) for i in range(len(text))]
    return tokens, scores, [int(t) for t in types]


def _encode(weights: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, bool]:
    """Quantize a weight matrix to ``qtype``; stays F32 when the row length is not a whole block."""
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if weights.ndim < 2 or weights.shape[-1] % block_size != 0:
        return weights.astype(np.float32), False
    return gguf.quants.quantize(weights.astype(np.float32), qtype), True


@dataclass(frozen=True, slots=True)
class _Shape:
    """The hyperparameters every tiny model has, whatever its architecture."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    vocab_size: int
    context_length: int

    def check(self, tensor_type: str) -> None:
        """ValueError unless llama.cpp can load a model of this shape with ``tensor_type`` weights."""
        n_embd, n_head, n_head_kv, vocab_size = self.n_embd, self.n_head, self.n_head_kv, self.vocab_size
        if tensor_type not in _QTYPES:
            raise ValueError(f"tensor_type must be one of {', '.join(TENSOR_TYPES)}, got {tensor_type!r}")
        if n_embd % n_head != 0 or (n_embd // n_head) % 2 != 0:
            raise ValueError(f"n_embd ({n_embd}) must split into n_head ({n_head}) heads of even size")
        if n_head % n_head_kv != 0:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")


def _random_weights(rng: np.random.Generator, shape: _Shape) -> dict[str, np.ndarray]:
    """All tensors of the model by GGUF name, in F32, with the logit-bias trick of the module docstring."""

    def normal(*dims: int, std: float = _WEIGHT_STD) -> np.ndarray:
        return rng.normal(0.0, std, size=dims).astype(np.float32)

    n_layer, n_embd, n_ff, vocab_size = shape.n_layer, shape.n_embd, shape.n_ff, shape.vocab_size
    kv_dim = shape.n_head_kv * (n_embd // shape.n_head)
    tensors: dict[str, np.ndarray] = {}
    embed = normal(vocab_size, n_embd, std=_EMBED_STD)
    embed[:, 0] = _BIAS_DIM_VALUE
    tensors["token_embd.weight"] = embed
    for i in range(n_layer):
        blk = f"blk.{i}"
        tensors[f"{blk}.attn_norm.weight"] = np.ones(n_embd, dtype=np.float32)
        tensors[f"{blk}.attn_q.weight"] = normal(n_embd, n_embd)
        tensors[f"{blk}.attn_k.weight"] = normal(kv_dim, n_embd)
        tensors[f"{blk}.attn_v.weight"] = normal(kv_dim, n_embd)
        tensors[f"{blk}.attn_output.weight"] = normal(n_embd, n_embd)
        tensors[f"{blk}.ffn_norm.weight"] = np.ones(n_embd, dtype=np.float32)
        tensors[f"{blk}.ffn_gate.weight"] = normal(n_ff, n_embd)
        tensors[f"{blk}.ffn_up.weight"] = normal(n_ff, n_embd)
        tensors[f"{blk}.ffn_down.weight"] = normal(n_embd, n_ff)
    tensors["output_norm.weight"] = np.ones(n_embd, dtype=np.float32)
    # Column 0 is the bias; a larger std on the other columns gives varied (not one repeated) tokens.
    output = normal(vocab_size, n_embd, std=_OUTPUT_STD)
    output[:, 0] = _BANNED_BIAS
    output[FIRST_TEXT_ID:, 0] = 0.0
    tensors["output.weight"] = output
    return tensors


def _add_tokenizer(writer: gguf.GGUFWriter, vocab_size: int, chat_template: str | None) -> None:
    """SentencePiece ("llama") tokenizer metadata, with the ChatML template unless it is None."""
    tokens, scores, token_types = _vocab(vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_eot_token_id(IM_END_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    # No implicit leading space: detokenize(tokenize(text)) then gives text back unchanged.
    writer.add_add_space_prefix(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _write(
    path: Path,
    arch: str,
    shape: _Shape,
    tensors: dict[str, np.ndarray],
    add_attention: Callable[[gguf.GGUFWriter], None],
    *,
    tensor_type: str,
    name: str,
    chat_template: str | None,
) -> Path:
    """Write a GGUF of architecture ``arch``: the shared hyperparameters, then the architecture's own keys
    (``add_attention``), the tokenizer and ``tensors`` (2-D weights encoded as ``tensor_type``); returns ``path``."""
    qtype = _QTYPES[tensor_type]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch)
    try:
        writer.add_name(name)
        writer.add_file_type(_FILE_TYPES[tensor_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(shape.vocab_size)
        writer.add_context_length(shape.context_length)
        writer.add_embedding_length(shape.n_embd)
        writer.add_block_count(shape.n_layer)
        writer.add_feed_forward_length(shape.n_ff)
        writer.add_head_count(shape.n_head)
        writer.add_head_count_kv(shape.n_head_kv)
        add_attention(writer)
        _add_tokenizer(writer, shape.vocab_size, chat_template)
        for tensor_name, weights in tensors.items():
            data, quantized = _encode(weights, qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype if quantized else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def write_tiny_llama(
    path: Path,
    *,
    tensor_type: str = "F32",
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    vocab_size: int = 512,
    context_length: int = 2048,
    chat_template: str | None = CHATML,
    seed: int = 0,
    name: str = "tiny-llama",
) -> Path:
    """Write a tiny random-weight LLaMA GGUF to ``path`` and return ``path``.

    The file loads in llama.cpp, tokenizes any UTF-8 text, and never samples an end-of-generation token,
    so a completion of ``max_tokens`` yields exactly that many tokens. 2-D weights use ``tensor_type``
    where their row length is a multiple of the quant block (32), norms stay F32. Same arguments give
    byte-identical files. ``chat_template=None`` writes no ``tokenizer.chat_template`` key.
    """
    shape = _Shape(n_layer, n_embd, n_head, n_head_kv, n_ff, vocab_size, context_length)
    shape.check(tensor_type)
    tensors = _random_weights(np.random.default_rng(seed), shape)

    def add_attention(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_dimension_count(n_embd // n_head)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)

    return _write(
        path, "llama", shape, tensors, add_attention, tensor_type=tensor_type, name=name, chat_template=chat_template
    )


# Gemma's post-attention and post-FFN norms rescale each layer's update to unit RMS before it joins the
# residual stream; a small norm weight keeps those updates below the bias dimension (module docstring).
_GEMMA_POST_NORM: Final[float] = 0.05


def write_tiny_gemma3(
    path: Path,
    *,
    tensor_type: str = "F32",
    sliding_window: int = 32,
    n_layer: int = 6,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    vocab_size: int = 512,
    context_length: int = 2048,
    chat_template: str | None = CHATML,
    seed: int = 0,
    name: str = "tiny-gemma3",
) -> Path:
    """Write a tiny random-weight Gemma 3 GGUF to ``path`` and return ``path``.

    Like :func:`write_tiny_llama` (same tokenizer, exact-length replies, deterministic bytes), with Gemma 3's
    sliding-window attention: llama.cpp makes every sixth layer global and the others attend to the last
    ``sliding_window`` tokens, so the default six layers give it both caches, as in the real models.
    ``sliding_window=0`` writes a Gemma 3 without a window (llama.cpp then uses global attention only).
    """
    shape = _Shape(n_layer, n_embd, n_head, n_head_kv, n_ff, vocab_size, context_length)
    shape.check(tensor_type)
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be 0 (none) or positive, got {sliding_window}")
    head_dim = n_embd // n_head
    tensors = _random_weights(np.random.default_rng(seed), shape)
    for i in range(n_layer):
        blk = f"blk.{i}"
        # llama.cpp's converter stores Gemma's RMSNorm weights with the +1 already added: 1.0 is identity.
        tensors[f"{blk}.attn_q_norm.weight"] = np.ones(head_dim, dtype=np.float32)
        tensors[f"{blk}.attn_k_norm.weight"] = np.ones(head_dim, dtype=np.float32)
        tensors[f"{blk}.post_attention_norm.weight"] = np.full(n_embd, _GEMMA_POST_NORM, dtype=np.float32)
        tensors[f"{blk}.post_ffw_norm.weight"] = np.full(n_embd, _GEMMA_POST_NORM, dtype=np.float32)

    def add_attention(writer: gguf.GGUFWriter) -> None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_freq_base(1_000_000.0)
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_sliding_window(sliding_window)

    return _write(
        path, "gemma3", shape, tensors, add_attention, tensor_type=tensor_type, name=name, chat_template=chat_template
    )


def tiny_model_set(directory: Path, **kwargs: Any) -> dict[str, Path]:
    """Write one tiny model per tensor type into ``directory``; keys are the type names (``"Q4_0"``…).

    Extra keyword arguments go to :func:`write_tiny_llama` for every file.
    """
    directory = Path(directory)
    return {
        tensor_type: write_tiny_llama(
            directory / f"tiny-llama-{tensor_type.lower()}.gguf",
            tensor_type=tensor_type,
            **kwargs,
        )
        for tensor_type in TENSOR_TYPES
    }
