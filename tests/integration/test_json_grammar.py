"""The JSON grammar as llama.cpp's own sampler applies it: what may come next inside a JSON string."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.engine.grammar import grammar_for

pytestmark = pytest.mark.integration

NOTE = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"],
        "additionalProperties": False}


@pytest.fixture(scope="module")
def vocab(tiny_models: dict[str, Path]) -> Iterator[Any]:
    """The tiny model's vocabulary: byte tokens <0x00>..<0xFF> besides printable ASCII."""
    import llama_cpp
    from llama_cpp import _internals

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = _internals.LlamaModel(path_model=str(tiny_models["F16"]), params=params, verbose=False)
    yield model
    model.close()


def allowed_after(model: Any, grammar: str, prefix: str, candidates: list[str]) -> dict[str, bool]:
    """Which ``candidates`` (token texts) the grammar sampler leaves possible once ``prefix`` is accepted."""
    import llama_cpp

    ids = {model.token_get_text(i): i for i in range(model.n_vocab())}
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    try:
        for char in prefix:
            llama_cpp.llama_sampler_accept(sampler, ids["\u2581" if char == " " else char])  # SentencePiece space
        data = (llama_cpp.llama_token_data * len(candidates))(
            *[llama_cpp.llama_token_data(id=ids[c], logit=0.0, p=0.0) for c in candidates])
        array = llama_cpp.llama_token_data_array(data=data, size=len(candidates), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(sampler, llama_cpp.ctypes.byref(array))
        return {c: data[i].logit != float("-inf") for i, c in enumerate(candidates)}
    finally:
        llama_cpp.llama_sampler_free(sampler)


@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
def test_a_string_refuses_raw_control_characters_and_takes_text_and_escapes(vocab: Any, kind: str) -> None:
    """JSON forbids a raw newline, tab or NUL inside a string (RFC 8259 §7); CI saw SmolLM2 write one under
    llama-cpp-python's converter, whose string rule allowed them, and json.loads refused the reply."""
    grammar = grammar_for(kind, NOTE if kind == "json_schema" else None)
    assert grammar is not None
    verdict = allowed_after(vocab, grammar, '{"note": "', ["<0x0A>", "<0x09>", "<0x00>", "<0x1F>", "<0x7F>",
                                                           "a", "\\", '"'])
    assert verdict == {"<0x0A>": False, "<0x09>": False, "<0x00>": False, "<0x1F>": False, "<0x7F>": False,
                       "a": True, "\\": True, '"': True}
    assert allowed_after(vocab, grammar, '{"note": "\\', ["n", "t", "u", "x"]) == {
        "n": True, "t": True, "u": True, "x": False}



@pytest.mark.parametrize("schema", [
    None,  # json_object
    NOTE,
    {"type": "object", "properties": {"char": {"type": "string", "maxLength": 3}}, "required": ["char"]},
    {"type": "array",
     "items": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}}}},
])
def test_no_string_rule_keeps_the_loose_class(vocab: Any, schema: dict[str, Any] | None) -> None:
    """Whatever the schema (and however the converter names its rules), every string character excludes control
    characters, and llama.cpp accepts the grammar."""
    import llama_cpp

    grammar = grammar_for("json_object" if schema is None else "json_schema", schema)
    assert grammar is not None
    assert '[^"\\\\]' not in grammar and '[^"\\\\\\x7F\\x00-\\x1F]' in grammar
    sampler = llama_cpp.llama_sampler_init_grammar(vocab.vocab, grammar.encode(), b"root")
    assert sampler is not None
    llama_cpp.llama_sampler_free(sampler)
