"""The llama.cpp grammar (GBNF) that makes a reply valid JSON, from a request's ``response_format``.

Small models asked for JSON in words still answer with prose around it, or stop half-way; a grammar
in the sampler chain removes every token that would break the JSON, so the text always parses (unless
generation stops at ``max_tokens`` first). llama-cpp-python ships the converter from JSON Schema to
GBNF (the one llama.cpp's server uses); this module chooses, checks, and mends one rule of it.

The mended rule: the converter's ``char`` (one character inside a JSON string) is ``[^"\\]``, which
lets a raw newline, tab or other control character into a string. JSON forbids those unescaped
(RFC 8259, section 7), so ``json.loads`` refused a reply SmolLM2 wrote under the grammar. llama.cpp's
own ``grammars/json.gbnf`` excludes them; :data:`JSON_CHAR_CLASS` is its class.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from agent.errors import BadRequestError

#: The converter's loose character class and the one JSON allows (llama.cpp's grammars/json.gbnf): no
#: quote, backslash or control character. Matched as a rule's whole start, whatever the rule is named.
_LOOSE_CHAR = re.compile(r'^([\w-]+) ::= \[\^"\\\\\] \| ', re.MULTILINE)
JSON_CHAR_CLASS = r'[^"\\\x7F\x00-\x1F]'


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
    return _LOOSE_CHAR.sub(lambda m: f"{m.group(1)} ::= {JSON_CHAR_CLASS} | ", grammar)
