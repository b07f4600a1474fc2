"""The llama.cpp grammar (GBNF) that makes a reply valid JSON, from a request's ``response_format``.

Small models asked for JSON in words still answer with prose around it, or stop half-way; a grammar
in the sampler chain removes every token that would break the JSON, so the text always parses (unless
generation stops at ``max_tokens`` first). llama-cpp-python ships the converter from JSON Schema to
GBNF (the one llama.cpp's server uses); this module chooses, checks, and mends one rule of it.

The mended rule: the converter's ``char`` (one character inside a JSON string) is ``[^"\\]``, which
lets a raw newline, tab or other control character into a string. JSON forbids those unescaped
(RFC 8259, section 7), so ``json.loads`` refused a reply SmolLM2 wrote under the grammar. llama.cpp's
own ``grammars/json.gbnf`` excludes them; :data:`JSON_CHAR` is that rule.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from agent.errors import BadRequestError

#: One character of a JSON string: anything but a quote, a backslash or a control character, or an escape.
JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_LOOSE_CHAR = re.compile(r"^char ::= .*$", re.MULTILINE)


def grammar_for(kind: str, schema: dict[str, Any] | None = None) -> str | None:
    """GBNF for ``kind`` ('text' → None, 'json_object' → any JSON object, 'json_schema' → ``schema``)."""
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_object()
    if schema is None:
        raise BadRequestError("response_format json_schema needs a schema")
    return _from_schema(json.dumps(schema, sort_keys=True))


@lru_cache(maxsize=1)
def _json_object() -> str:
    return _from_schema(json.dumps({"type": "object"}))


@lru_cache(maxsize=64)
def _from_schema(schema_json: str) -> str:
    """Compiled once per distinct schema: automations send the same one again and again."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # noqa: PLC0415 - loaded with the model anyway

    try:
        grammar = str(json_schema_to_gbnf(schema_json))
    except Exception as exc:  # the converter raises ValueError, KeyError, NotImplementedError ... on odd schemas
        raise BadRequestError(
            f"response_format: this JSON Schema cannot be enforced ({type(exc).__name__}: {exc})"
        ) from exc
    return _LOOSE_CHAR.sub(lambda _: JSON_CHAR, grammar)
