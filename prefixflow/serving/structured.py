"""Structured output: OpenAI's ``response_format`` (``json_schema``, ``json_object``) as a token constraint.

A schema is compiled once per server (cached by its text) by xgrammar into a grammar over the base's tokenizer;
each request gets its own matcher (``GrammarConstraint``, the engine's ``TokenConstraint``), which masks the logits
of every token that cannot continue a valid document and ends the request (``stop``) when the document is complete.
Whitespace between JSON tokens is fixed (compact separators), so a small model cannot pad a document forever.

xgrammar was chosen by measurement (``benchmarks/bench_grammar.py``, docs/benchmarks.md): about 0.3 ms per token
for the mask on a CPU against 6 to 40 ms for llguidance, lm-format-enforcer and outlines-core. It silently ignores
some JSON Schema keywords (an ``allOf`` came out unenforced), so a schema is first checked against the keywords it
honours (``UNSUPPORTED``); any other keyword is refused with 400 naming it, rather than served unenforced.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from typing import Any

import torch
import xgrammar as xgr

from prefix_core.errors import PrefixError

# Keywords xgrammar does not enforce (or enforces only in part): refused, never ignored.
UNSUPPORTED = frozenset({
    "allOf", "oneOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "patternProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems", "uniqueItems", "contains",
    "minContains", "maxContains", "multipleOf", "minProperties", "maxProperties", "additionalItems", "$dynamicRef",
    "$recursiveRef",
})
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # keyword -> {name: schema}
_SCHEMA_LISTS = ("anyOf", "prefixItems")  # keyword -> [schema, ...]
_SCHEMA_ONE = ("items", "additionalProperties")  # keyword -> schema (or a bool)


class StructuredOutputError(PrefixError):
    """A response_format the server cannot honour (HTTP 400)."""


def check_schema(schema: Any, where: str = "schema") -> None:
    """StructuredOutputError naming the first keyword of ``schema`` (recursively) that is not honoured."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
    for key in sorted(UNSUPPORTED & schema.keys()):
        if key == "uniqueItems" and schema[key] is False:
            continue
        raise StructuredOutputError(
            f"{where} uses {key!r}, which structured output cannot enforce; rewrite the schema without it (anyOf, "
            "enum, const, $ref, properties/required, items with minItems/maxItems, string lengths and patterns, "
            "numeric ranges are enforced)")
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            check_schema(sub, f"{where}.{key}.{name}")
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            check_schema(sub, f"{where}.{key}[{i}]")
    for key in _SCHEMA_ONE:
        if key in schema:
            check_schema(schema[key], f"{where}.{key}")


class GrammarConstraint:
    """One request's matcher: the engine's ``TokenConstraint`` over a compiled grammar."""

    def __init__(self, compiled, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(logits, self.bitmask[0], vocab_size=self.vocab_size)

    def can_start(self) -> bool:
        """Whether any token of the vocabulary may begin the document (a tokenizer without ``{`` cannot)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return bool(self.bitmask.any())

    def accept(self, token: int) -> bool:
        """Advance; True when the document is complete (its end token accepted), or the token was refused."""
        return not self.matcher.accept_token(token) or self.matcher.is_terminated()


class StructuredOutput:
    """Compiles response formats for one tokenizer. ``vocab_size``: the width of the model's logits. Factories
    are cached by schema text (a refused schema is checked again at its next use); thread-safe (request handlers
    compile in worker threads)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=True)
        self._lock = threading.Lock()
        self._factories: dict[str, Callable[[], GrammarConstraint]] = {}  # schema text -> factory

    def constraint(self, response_format: dict) -> Callable[[], GrammarConstraint] | None:
        """A factory of per-request constraints for an OpenAI ``response_format`` (None for ``text``);
        StructuredOutputError saying why when it cannot be honoured."""
        kind = response_format.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":  # any JSON object (OpenAI's JSON mode), compact like a schema's
            schema: Any = {"type": "object"}
        elif kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            if schema is None:
                raise StructuredOutputError("response_format.json_schema.schema is missing: give the JSON Schema "
                                            "the output must follow")
            check_schema(schema, "response_format.json_schema.schema")
        else:
            raise StructuredOutputError(f"response_format type {kind!r} is not supported; use text, json_object "
                                        "or json_schema")
        text = json.dumps(schema, sort_keys=True)
        with self._lock:  # checked, compiled and probed once per schema, not once per request
            if text not in self._factories:
                self._factories[text] = self._compile(text)
            return self._factories[text]

    def _compile(self, text: str) -> Callable[[], GrammarConstraint]:
        try:
            compiled = self.compiler.compile_json_schema(text, any_whitespace=False)
        except Exception as err:  # xgrammar raises RuntimeError/ValueError with its parser's message
            raise StructuredOutputError(f"response_format.json_schema.schema cannot be compiled: "
                                        f"{str(err).strip().splitlines()[0][:300]}") from None
        if not GrammarConstraint(compiled, self.vocab_size).can_start():
            raise StructuredOutputError("this base model's tokenizer has no token that can begin such a document; "
                                        "structured output needs a tokenizer that can write JSON")
        return functools.partial(GrammarConstraint, compiled, self.vocab_size)
