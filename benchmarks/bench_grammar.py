"""Benchmark grammar (JSON-schema constrained decoding) libraries on CPU with the embedded SmolLM2-135M.

What it measures, per library and per JSON schema (see SCHEMAS below):

1. whether the library accepts the schema (or the error it raises);
2. one-off tokenizer set-up time (``setup_ms``), the first schema compile (``compile_ms_first``) and the
   median of repeated compiles with any cache off (``compile_ms``);
3. the per-token grammar cost while greedily decoding with the real model: computing the allowed-token
   mask (``fill``), applying it to the fp32 logits (``apply``: disallowed logits set to -inf) and
   advancing the matcher with the chosen token (``advance``); ``mask_us_median``/``mask_us_p95`` are
   the sum of the three per token, in microseconds, and ``first_mask_us`` is the very first mask of a
   request (lazy libraries pay there). The model's own forward time per token is reported next to it;
4. whether the produced text parses with ``json.loads`` and validates with ``jsonschema``;
5. the CPU cost of each library's own "apply bitmask" helper (some are ``torch.compile`` kernels, which
   need a C++ compiler on CPU), in a separate micro-benchmark.

Decoding runs up to ``--max-tokens`` new tokens, stops when the grammar says it is finished or EOS is
chosen. Libraries are interleaved per schema so that they see the same background CPU load.

The candidate libraries are not project dependencies; install them elsewhere and put them on PYTHONPATH:

    .venv/bin/python -m pip install --target /tmp/gram/libs --no-deps \\
        xgrammar==0.2.8 apache-tvm-ffi outlines-core==0.2.14 lm-format-enforcer==0.11.3 interegular \\
        llguidance==1.9.1

Run (from the repo root, ~5-10 minutes on 2 cores):

    HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/gram/libs .venv/bin/python benchmarks/bench_grammar.py \\
        --out benchmarks/results/grammar_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

Schema = dict[str, Any]

# --------------------------------------------------------------------------------------------------------------
# Schemas: (name, schema). The first group should be supported everywhere; the last group probes features that
# some libraries refuse (or silently ignore, which the jsonschema validation then shows).
# --------------------------------------------------------------------------------------------------------------
SCHEMAS: list[tuple[str, Schema]] = [
    (
        "flat_scalars",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "rating": {"type": "number"},
                "seats": {"type": "integer"},
                "open_now": {"type": "boolean"},
            },
            "required": ["name", "rating", "seats", "open_now"],
            "additionalProperties": False,
        },
    ),
    (
        "optional_props",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "city": {"type": "string"},
                "phone": {"type": "string"},
                "vegan_friendly": {"type": "boolean"},
            },
            "required": ["name"],
            "additionalProperties": False,
        },
    ),
    (
        "enums",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "cuisine": {"type": "string", "enum": ["italian", "japanese", "mexican", "indian", "french"]},
                "price_range": {"enum": ["$", "$$", "$$$", "$$$$"]},
                "stars": {"type": "integer", "enum": [1, 2, 3]},
            },
            "required": ["name", "cuisine", "price_range", "stars"],
            "additionalProperties": False,
        },
    ),
    (
        "nested_objects",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "geo": {
                            "type": "object",
                            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                            "required": ["lat", "lon"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["street", "city", "geo"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
    ),
    (
        "array_bounds",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "dishes": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 3},
            },
            "required": ["name", "dishes"],
            "additionalProperties": False,
        },
    ),
    (
        "array_of_objects",
        {
            "type": "object",
            "properties": {
                "menu": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"dish": {"type": "string"}, "price": {"type": "number"}},
                        "required": ["dish", "price"],
                        "additionalProperties": False,
                    },
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["menu"],
            "additionalProperties": False,
        },
    ),
    (
        "string_lengths",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 3, "maxLength": 20},
                "tagline": {"type": "string", "maxLength": 40},
            },
            "required": ["name", "tagline"],
            "additionalProperties": False,
        },
    ),
    (
        "numeric_ranges",
        {
            "type": "object",
            "properties": {
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                "avg_price": {"type": "number", "minimum": 0, "maximum": 500},
                "tables": {"type": "integer", "exclusiveMinimum": 0},
            },
            "required": ["rating", "avg_price", "tables"],
            "additionalProperties": False,
        },
    ),
    (
        "anyof_nullable",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "website": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "capacity": {"anyOf": [{"type": "integer"}, {"type": "string", "enum": ["unknown"]}]},
                "closed_on": {"type": ["string", "null"]},
            },
            "required": ["name", "website", "capacity", "closed_on"],
            "additionalProperties": False,
        },
    ),
    (
        "openai_strict_style",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "cuisine": {"type": "string", "enum": ["italian", "thai", "other"]},
                "dishes": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "vegetarian": {"type": "boolean"},
                            "price": {"type": ["number", "null"]},
                        },
                        "required": ["name", "vegetarian", "price"],
                        "additionalProperties": False,
                    },
                },
                "rating": {"type": "integer"},
            },
            "required": ["name", "cuisine", "dishes", "rating"],
            "additionalProperties": False,
        },
    ),
    # ---- features that some libraries may refuse or ignore ----
    (
        "pattern_regex",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "phone": {"type": "string", "pattern": "^\\+?[0-9][0-9 -]{6,14}$"},
            },
            "required": ["name", "zip", "phone"],
            "additionalProperties": False,
        },
    ),
    (
        "ref_defs",
        {
            "type": "object",
            "$defs": {
                "address": {
                    "type": "object",
                    "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                    "required": ["street", "city"],
                    "additionalProperties": False,
                }
            },
            "properties": {
                "name": {"type": "string"},
                "address": {"$ref": "#/$defs/address"},
                "branches": {"type": "array", "items": {"$ref": "#/$defs/address"}, "maxItems": 2},
            },
            "required": ["name", "address", "branches"],
            "additionalProperties": False,
        },
    ),
    (
        "recursive_ref",
        {
            "type": "object",
            "$defs": {
                "category": {
                    "type": "object",
                    "properties": {
                        "title": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/category"}, "maxItems": 2},
                    },
                    "required": ["title", "children"],
                    "additionalProperties": False,
                }
            },
            "properties": {"name": {"type": "string"}, "menu": {"$ref": "#/$defs/category"}},
            "required": ["name", "menu"],
            "additionalProperties": False,
        },
    ),
    (
        "additional_props_true",
        {
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
            "additionalProperties": True,
        },
    ),
    (
        "formats_allof",
        {
            "type": "object",
            "allOf": [
                {"properties": {"name": {"type": "string"}}, "required": ["name"]},
                {"properties": {"opened": {"type": "string", "format": "date"}}, "required": ["opened"]},
            ],
            "properties": {
                "email": {"type": "string", "format": "email"},
                "website": {"type": "string", "format": "uri"},
            },
            "required": ["email", "website"],
        },
    ),
    (
        "unique_items_min_props",
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True, "maxItems": 4},
                "extras": {
                    "type": "object",
                    "patternProperties": {"^x_": {"type": "integer"}},
                    "minProperties": 1,
                },
            },
            "required": ["tags", "extras"],
        },
    ),
]

PROMPT = "Describe a restaurant as JSON. Answer with only the JSON object, following this JSON schema: {schema}"


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------
_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits whose bit is 0 in an int32 bitmask (1-D or 2-D, ceil(V/32) words) to -inf, plain eager torch."""
    vocab = logits.shape[-1]
    bits = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).bool().flatten(-2)
    covered = min(vocab, bits.shape[-1])
    if covered < vocab:  # logits wider than the mask: the extra (padding) ids are never allowed
        logits[..., covered:] = -math.inf
    logits[..., :covered].masked_fill_(~bits[..., :covered], -math.inf)


def byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode map: token character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes_table(tokenizer: Any) -> dict[int, bytes]:
    """Raw bytes of every regular (non-special) token, for libraries that want a byte vocabulary."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    decoder_json = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    byte_level = decoder_json.get("type") == "ByteLevel"
    table: dict[int, bytes] = {}
    if byte_level:
        dec = byte_level_decoder()
        for tok, idx in vocab.items():
            if idx in special:
                continue
            try:
                table[idx] = bytes(dec[c] for c in tok)
            except KeyError:  # an added non-byte-level token: its text is literal
                table[idx] = tok.encode()
    else:  # SentencePiece-style: "▁" is a space, "<0xNN>" a raw byte
        for tok, idx in vocab.items():
            if idx in special:
                continue
            if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                table[idx] = bytes([int(tok[3:5], 16)])
            else:
                table[idx] = tok.replace("▁", " ").encode()
    return table


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def short_error(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " | ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# Library adapters: each wraps one library behind the same small interface.
# --------------------------------------------------------------------------------------------------------------
class Backend(ABC):
    name: str = ""
    dist: str = ""  # distribution name for version / declared-dependency look-up
    module: str = ""
    apply_note: str = ""

    def __init__(self, tokenizer: Any, vocab_size: int, compact: bool) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's logits width
        self.eos = int(tokenizer.eos_token_id)
        self.compact = compact

    @abstractmethod
    def setup(self) -> None:
        """One-off per tokenizer: build the library's tokenizer info."""

    @abstractmethod
    def compile(self, schema: Schema, cache: bool = True) -> Any:
        """Compile a schema; raise if the library refuses it."""

    @abstractmethod
    def start(self, compiled: Any, prompt: list[int]) -> None:
        """Create a fresh per-request matcher (prompt: the prompt's token ids, for libraries keyed on them)."""

    @abstractmethod
    def fill(self, tokens: list[int]) -> None:
        """Compute the allowed-token mask for the next token (tokens: generated so far)."""

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> None:
        """Apply the mask computed by fill() to 1-D fp32 logits in place."""

    @abstractmethod
    def advance(self, token: int) -> bool:
        """Advance the matcher with the chosen token; False if it rejects it."""

    @abstractmethod
    def finished(self, eos_chosen: bool) -> bool:
        """Whether the grammar is complete (after the last accepted token)."""

    def terminated(self) -> bool:
        """Whether the matcher refuses any further token (decode can stop without EOS)."""
        return False

    def kernel_apply(self) -> tuple[str, Any] | None:
        """The library's own helper that applies an int32 bitmask to a 2-D logits tensor, if it has one."""
        return None


class XGrammarBackend(Backend):
    name, dist, module = "xgrammar", "xgrammar", "xgrammar"
    apply_note = "xgr.apply_token_bitmask_inplace (native C++ CPU kernel)"

    def setup(self) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self.bitmask = xgr.allocate_token_bitmask(1, self.info.vocab_size)

    def compile(self, schema: Schema, cache: bool = True) -> Any:
        compiler = self.compiler if cache else self.xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        return compiler.compile_json_schema(schema, any_whitespace=not self.compact)

    def start(self, compiled: Any, prompt: list[int]) -> None:
        self.matcher = self.xgr.GrammarMatcher(compiled)

    def fill(self, tokens: list[int]) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask)

    def apply(self, logits: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, self.bitmask[0], vocab_size=self.vocab_size)

    def advance(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    def finished(self, eos_chosen: bool) -> bool:
        return bool(self.matcher.is_terminated())

    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def kernel_apply(self) -> tuple[str, Any] | None:
        return ("xgrammar.apply_token_bitmask_inplace (C++ CPU)", self.xgr.apply_token_bitmask_inplace)


class LLGuidanceBackend(Backend):
    name, dist, module = "llguidance", "llguidance", "llguidance"
    apply_note = "shared eager-torch unpack (llguidance.torch.apply_token_bitmask_inplace is torch.compile)"

    def setup(self) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
        self.bitmask = torch.full((1, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def compile(self, schema: Schema, cache: bool = True) -> Any:
        options: dict[str, Any] = {}
        if self.compact:
            options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=options or None)
        is_error, messages = self.llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if is_error:
            raise ValueError("; ".join(messages))
        matcher = self.llg.LLMatcher(self.lltok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        self.warnings = list(messages)
        return grammar, matcher

    def start(self, compiled: Any, prompt: list[int]) -> None:
        _grammar, matcher = compiled
        # The matcher built at compile time is the per-request one; a later request takes a deep copy of it.
        self.matcher = matcher.deep_copy()

    def fill(self, tokens: list[int]) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)

    def apply(self, logits: torch.Tensor) -> None:
        apply_bitmask_torch(logits, self.bitmask[0])

    def advance(self, token: int) -> bool:
        return bool(self.matcher.consume_token(token))

    def finished(self, eos_chosen: bool) -> bool:
        return not self.matcher.is_error() and (self.matcher.is_stopped() or self.matcher.is_accepting())

    def terminated(self) -> bool:
        return bool(self.matcher.is_stopped())

    def kernel_apply(self) -> tuple[str, Any] | None:
        import llguidance.torch

        return (
            "llguidance.torch.apply_token_bitmask_inplace (torch.compile)",
            llguidance.torch.apply_token_bitmask_inplace,
        )


class OutlinesCoreBackend(Backend):
    name, dist, module = "outlines-core", "outlines_core", "outlines_core"
    apply_note = "shared eager-torch unpack (outlines_core.kernels.torch.apply_token_bitmask_inplace is torch.compile)"

    def setup(self) -> None:
        import outlines_core

        self.oc = outlines_core
        mapping: dict[bytes, list[int]] = {}
        for idx, raw in token_bytes_table(self.tokenizer).items():
            if idx != self.eos and idx < self.vocab_size:
                mapping.setdefault(raw, []).append(idx)
        self.vocabulary = outlines_core.Vocabulary(self.eos, mapping)
        self.bitmask = torch.full((1, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def compile(self, schema: Schema, cache: bool = True) -> Any:
        whitespace = r"[ ]?" if self.compact else None
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern=whitespace)
        return self.oc.Index(regex, self.vocabulary)

    def start(self, compiled: Any, prompt: list[int]) -> None:
        self.guide = self.oc.Guide(compiled)

    def fill(self, tokens: list[int]) -> None:
        self.guide.write_mask_into(self.bitmask.data_ptr(), self.bitmask.numel(), 4)

    def apply(self, logits: torch.Tensor) -> None:
        apply_bitmask_torch(logits, self.bitmask[0])

    def advance(self, token: int) -> bool:
        if token == self.eos:  # EOS is allowed in a final state but Guide.advance(eos) raises: do not advance
            return bool(self.guide.is_finished())
        try:
            self.guide.advance(token, return_tokens=False)
        except (ValueError, RuntimeError):
            return False
        return True

    def finished(self, eos_chosen: bool) -> bool:
        return bool(self.guide.is_finished())

    def kernel_apply(self) -> tuple[str, Any] | None:
        from outlines_core.kernels import torch as oc_torch

        return (
            "outlines_core.kernels.torch.apply_token_bitmask_inplace (torch.compile)",
            oc_torch.apply_token_bitmask_inplace,
        )


class LMFormatEnforcerBackend(Backend):
    name, dist, module = "lm-format-enforcer", "lm-format-enforcer", "lmformatenforcer"
    apply_note = "allowed-id list -> index_fill (library returns a Python list of allowed ids)"

    def setup(self) -> None:
        import lmformatenforcer
        from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

        self.lmfe = lmformatenforcer
        n = min(len(self.tokenizer), self.vocab_size)
        # lmformatenforcer.integrations.transformers.build_token_enforcer_tokenizer_data does exactly this, but that
        # module fails to import with transformers 5 (it imports transformers.tokenization_utils), so inline it.
        tok = self.tokenizer
        token_0 = tok.encode("0")[-1]
        special = set(tok.all_special_ids)
        regular: list[tuple[int, str, bool]] = []
        for idx in range(n):
            if idx in special:
                continue
            after_0 = tok.decode([token_0, idx])[1:]
            alone = tok.decode([idx])
            regular.append((idx, after_0, len(after_0) > len(alone)))

        def decode(ids: list[int]) -> str:
            return tok.decode(ids).rstrip("\ufffd")

        self.data = TokenEnforcerTokenizerData(regular, decode, self.eos, False, n)

    def compile(self, schema: Schema, cache: bool = True) -> Any:
        from lmformatenforcer import JsonSchemaParser

        return schema, JsonSchemaParser(schema)

    def start(self, compiled: Any, prompt: list[int]) -> None:
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        schema, _ = compiled
        self.enforcer = TokenEnforcer(self.data, JsonSchemaParser(schema))
        self.prompt = list(prompt)  # the enforcer keys its state on the whole token tuple, prompt included
        self.allowed: list[int] = []

    def fill(self, tokens: list[int]) -> None:
        self.allowed = self.enforcer.get_allowed_tokens(self.prompt + tokens).allowed_tokens

    def apply(self, logits: torch.Tensor) -> None:
        allowed = torch.tensor(self.allowed, dtype=torch.long)
        kept = logits.index_select(0, allowed)
        logits.fill_(-math.inf)
        logits.index_copy_(0, allowed, kept)

    def advance(self, token: int) -> bool:
        return token in self.allowed  # the state update happens inside the next get_allowed_tokens()

    def finished(self, eos_chosen: bool) -> bool:
        return eos_chosen

    def terminated(self) -> bool:
        return self.allowed == [self.eos]


BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (XGrammarBackend, LLGuidanceBackend, OutlinesCoreBackend, LMFormatEnforcerBackend)
}


# --------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    lib: str
    schema: str
    accepted: bool
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    compile_ms_first: float | None = None
    compile_ms: float | None = None
    first_mask_us: float | None = None
    mask_us_median: float | None = None
    mask_us_p95: float | None = None
    mask_cpu_us_median: float | None = None
    mask_cpu_us_p95: float | None = None
    fill_us_median: float | None = None
    apply_us_median: float | None = None
    advance_us_median: float | None = None
    forward_ms_per_token: float | None = None
    tokens: int | None = None
    finished: bool | None = None
    stop_reason: str | None = None
    parses: bool | None = None
    valid: bool | None = None
    validation_error: str | None = None
    text: str | None = None


class Model:
    def __init__(self, folder: str, pad_vocab: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.pad_vocab = pad_vocab
        self.vocab_size = int(self.model.config.vocab_size) + pad_vocab

    def prompt_ids(self, schema: Schema) -> torch.Tensor:
        messages = [{"role": "user", "content": PROMPT.format(schema=json.dumps(schema))}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return torch.tensor([list(ids)], dtype=torch.long)

    def forward(self, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One model step; returns the last position's 1-D fp32 logits (a normal, writable tensor) and the cache."""
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1].float().clone()  # cloned outside inference mode, so in-place masking is allowed
        if self.pad_vocab:  # simulate a padded lm_head: extra ids with a high logit that must be masked
            logits = torch.cat([logits, torch.full((self.pad_vocab,), 100.0)])
        return logits, out.past_key_values


def validate(text: str, schema: Schema) -> tuple[bool, bool, str | None]:
    """(parses, valid, error) for the generated text against the schema."""
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError as exc:
        return False, False, short_error(exc)
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    if errors:
        return True, False, "; ".join(f"{list(e.path)}: {e.message}"[:160] for e in errors[:3])
    return True, True, None


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, (time.perf_counter() - t0) * 1000.0


@contextlib.contextmanager
def captured_stderr(sink: list[str]) -> Iterator[None]:
    """Capture what native code writes to file descriptor 2 (e.g. xgrammar's C++ warnings) into sink."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.extend(line for line in tmp.read().decode(errors="replace").splitlines() if line.strip())


def clock() -> tuple[int, int]:
    """(wall ns, this thread's CPU ns): CPU time is robust to other processes taking the cores."""
    return time.perf_counter_ns(), time.thread_time_ns()


def run_one(backend: Backend, model: Model, name: str, schema: Schema, args: argparse.Namespace) -> RunResult:
    result = RunResult(lib=backend.name, schema=name, accepted=False)
    # -- compile: the first compile (its native stderr captured as warnings), then repeats with the cache off
    native_log: list[str] = []
    try:
        with captured_stderr(native_log):
            compiled, first_ms = timed(backend.compile, schema)
    except Exception as exc:
        result.error = short_error(exc)
        result.warnings = native_log[:5]
        return result
    result.accepted = True
    result.warnings = [*list(getattr(backend, "warnings", []) or []), *native_log[:5]]
    backend.warnings = []
    result.compile_ms_first = round(first_ms, 3)
    repeats = [first_ms]
    if first_ms < 2000:
        for _ in range(args.compile_repeats - 1):
            _, ms = timed(backend.compile, schema, cache=False)
            repeats.append(ms)
    result.compile_ms = round(statistics.median(repeats[1:] or repeats), 3)

    fill_us: list[float] = []
    apply_us: list[float] = []
    advance_us: list[float] = []
    cpu_us: list[float] = []
    forward_ms: list[float] = []
    generated: list[int] = []
    stop_reason = "max_tokens"
    eos_chosen = False
    try:
        prompt = model.prompt_ids(schema)
        backend.start(compiled, prompt[0].tolist())
        logits, cache = model.forward(prompt, None)
        for step in range(args.max_tokens):
            if step:
                t0 = time.perf_counter()
                logits, cache = model.forward(torch.tensor([[generated[-1]]]), cache)
                forward_ms.append((time.perf_counter() - t0) * 1000.0)
            w0, c0 = clock()
            backend.fill(generated)
            w1, _ = clock()
            backend.apply(logits)
            w2, c2 = clock()
            token = int(torch.argmax(logits))
            if math.isinf(float(logits[token])):
                stop_reason = "all_tokens_masked"
                break
            w3, c3 = clock()
            ok = backend.advance(token)
            w4, c4 = clock()
            fill_us.append((w1 - w0) / 1e3)
            apply_us.append((w2 - w1) / 1e3)
            advance_us.append((w4 - w3) / 1e3)
            cpu_us.append((c2 - c0 + c4 - c3) / 1e3)
            if not ok:
                stop_reason = "token_rejected"
                break
            if token == backend.eos:
                stop_reason, eos_chosen = "eos", True
                break
            generated.append(token)
            if backend.terminated():
                stop_reason = "grammar_terminated"
                break
        result.finished = backend.finished(eos_chosen)
    except Exception as exc:
        stop_reason = "exception: " + short_error(exc)
        traceback.print_exc()
    totals = [f + a + d for f, a, d in zip(fill_us, apply_us, advance_us, strict=True)]
    result.stop_reason = stop_reason
    result.tokens = len(generated)
    if totals:
        result.first_mask_us = round(totals[0], 1)
        result.mask_us_median = round(statistics.median(totals), 1)
        result.mask_us_p95 = round(percentile(totals, 0.95), 1)
        result.mask_cpu_us_median = round(statistics.median(cpu_us), 1)
        result.mask_cpu_us_p95 = round(percentile(cpu_us, 0.95), 1)
        result.fill_us_median = round(statistics.median(fill_us), 1)
        result.apply_us_median = round(statistics.median(apply_us), 1)
        result.advance_us_median = round(statistics.median(advance_us), 1)
    if forward_ms:
        result.forward_ms_per_token = round(statistics.median(forward_ms), 3)
    result.text = model.tokenizer.decode(generated, skip_special_tokens=True)
    result.parses, result.valid, result.validation_error = validate(result.text, schema)
    return result


def merge_repeats(runs: list[RunResult]) -> RunResult:
    """Combine repeated runs of one (lib, schema): medians of the timing fields, the first run's output."""
    base = runs[0]
    if len(runs) == 1 or not base.accepted:
        return base
    merged = RunResult(**asdict(base))
    for key in (
        "compile_ms",
        "mask_us_median",
        "mask_us_p95",
        "mask_cpu_us_median",
        "mask_cpu_us_p95",
        "fill_us_median",
        "apply_us_median",
        "advance_us_median",
        "forward_ms_per_token",
    ):
        values = [getattr(r, key) for r in runs if getattr(r, key) is not None]
        if values:
            setattr(merged, key, round(statistics.median(values), 3))
    return merged


def bench_kernels(backends: list[Backend], vocab_size: int, iters: int = 200) -> list[dict[str, Any]]:
    """Time each library's own apply-bitmask helper on [1, V] fp32 logits, plus the shared eager one."""
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (1, (vocab_size + 31) // 32), dtype=torch.int32, generator=gen)
    base = torch.randn(1, vocab_size, generator=gen)
    expected = base.clone()
    apply_bitmask_torch(expected, bitmask)
    candidates: list[tuple[str, Any]] = [("shared eager torch (this script)", apply_bitmask_torch)]
    for backend in backends:
        with contextlib.suppress(Exception):
            kernel = backend.kernel_apply()
            if kernel:
                candidates.append(kernel)
    rows: list[dict[str, Any]] = []
    for label, fn in candidates:
        row: dict[str, Any] = {"kernel": label}
        try:
            logits = base.clone()
            _, row["first_call_ms"] = timed(fn, logits, bitmask)
            row["correct"] = bool(torch.equal(logits, expected))
            samples = []
            for _ in range(iters):
                logits.copy_(base)
                _, ms = timed(fn, logits, bitmask)
                samples.append(ms * 1000.0)
            row["median_us"] = round(statistics.median(samples), 1)
            row["first_call_ms"] = round(row["first_call_ms"], 1)
        except Exception as exc:
            row["error"] = short_error(exc)
        rows.append(row)
    return rows


def library_info(backend_cls: type[Backend]) -> dict[str, Any]:
    """Version, declared dependencies and installed size of the library's own distribution."""
    info: dict[str, Any] = {}
    try:
        dist = importlib.metadata.distribution(backend_cls.dist)
        info["version"] = dist.version
        info["requires"] = [r for r in (dist.requires or []) if "extra ==" not in r]
        files = dist.files or []
        info["installed_kb"] = round(sum((f.size or 0) for f in files) / 1024)
        info["location"] = str(dist.locate_file(""))
    except importlib.metadata.PackageNotFoundError as exc:
        info["error"] = short_error(exc)
    return info


def cpu_info() -> dict[str, Any]:
    model_name = ""
    with contextlib.suppress(Exception):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model_name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    loadavg = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": model_name,
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_start": loadavg,
    }


def print_table(results: list[RunResult]) -> None:
    """One line per (lib, schema). µs columns: per-token fill+apply+advance, wall clock and this thread's CPU time."""
    header = (
        f"{'lib':<19}{'schema':<23}{'ok':<4}{'comp1 ms':>9}{'comp ms':>9}{'1st µs':>8}{'med µs':>8}{'p95 µs':>8}"
        f"{'cpu med':>8}{'cpu p95':>8}{'fwd ms':>8}{'tok':>5}{'fin':>4}{'valid':>6}  stop / error"
    )
    print(header)
    print("-" * len(header))

    def fmt(value: float | None, width: int, digits: int = 1) -> str:
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    for r in results:
        if not r.accepted:
            print(f"{r.lib:<19}{r.schema:<23}{'NO':<4}{'':>82}  {(r.error or '')[:90]}")
            continue
        tail = r.stop_reason or ""
        if r.validation_error and not r.valid:
            tail += " | " + r.validation_error[:60]
        print(
            f"{r.lib:<19}{r.schema:<23}{'yes':<4}{fmt(r.compile_ms_first, 9)}{fmt(r.compile_ms, 9)}"
            f"{fmt(r.first_mask_us, 8, 0)}{fmt(r.mask_us_median, 8, 0)}{fmt(r.mask_us_p95, 8, 0)}"
            f"{fmt(r.mask_cpu_us_median, 8, 0)}{fmt(r.mask_cpu_us_p95, 8, 0)}"
            f"{fmt(r.forward_ms_per_token, 8)}{r.tokens or 0:>5}{('y' if r.finished else 'n'):>4}"
            f"{('y' if r.valid else 'n'):>6}  {tail}"
        )


def summarize(results: list[RunResult], libs: list[str]) -> dict[str, Any]:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 2) if present else None

    def top(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(max(present), 2) if present else None

    summary: dict[str, Any] = {}
    for lib in libs:
        rows = [r for r in results if r.lib == lib]
        ran = [r for r in rows if r.accepted and r.mask_us_median is not None]
        summary[lib] = {
            "schemas": len(rows),
            "accepted": sum(r.accepted for r in rows),
            "refused": [r.schema for r in rows if not r.accepted],
            "finished": sum(bool(r.finished) for r in rows),
            "valid": sum(bool(r.valid) for r in rows),
            "accepted_but_invalid_output": [r.schema for r in rows if r.accepted and r.finished and not r.valid],
            "median_mask_us": med([r.mask_us_median for r in ran]),
            "median_mask_cpu_us": med([r.mask_cpu_us_median for r in ran]),
            "max_mask_cpu_us_p95": top([r.mask_cpu_us_p95 for r in ran]),
            "median_first_mask_us": med([r.first_mask_us for r in ran]),
            "median_compile_ms": med([r.compile_ms for r in ran]),
            "max_compile_ms_first": top([r.compile_ms_first for r in ran]),
            "median_forward_ms": med([r.forward_ms_per_token for r in ran]),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libs", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    parser.add_argument("--schemas", default="", help="comma list of schema names (default: all)")
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=1, help="decode runs per (lib, schema); timings are medians")
    parser.add_argument("--compile-repeats", type=int, default=3, help="compiles per schema (first + cache-off)")
    parser.add_argument("--compact", action="store_true", help="no free whitespace in the JSON (lib options)")
    parser.add_argument("--pad-vocab", type=int, default=0, help="pretend the lm_head has N extra padded ids")
    parser.add_argument("--no-kernels", action="store_true", help="skip the apply-bitmask kernel micro-benchmark")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="benchmarks/results/grammar_cpu.json")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from prefix_core.base_model import embedded_model_dir

    folder = str(embedded_model_dir(args.model))
    model = Model(folder, args.pad_vocab)
    print(
        f"model {args.model}: config.vocab_size={model.model.config.vocab_size} len(tokenizer)={len(model.tokenizer)}"
        f" logits width used={model.vocab_size} eos={model.tokenizer.eos_token!r}({model.tokenizer.eos_token_id})"
    )
    wanted = [s.strip() for s in args.schemas.split(",") if s.strip()]
    schemas = [(n, s) for n, s in SCHEMAS if not wanted or n in wanted]

    backends: list[Backend] = []
    libs_meta: dict[str, Any] = {}
    for lib in [x.strip() for x in args.libs.split(",") if x.strip()]:
        cls = BACKENDS.get(lib)
        if cls is None:
            print(f"skip {lib}: unknown library (choose from {', '.join(BACKENDS)})")
            continue
        try:
            importlib.import_module(cls.module)
        except Exception as exc:
            print(f"skip {lib}: not importable ({short_error(exc, 160)})")
            libs_meta[lib] = {"skipped": short_error(exc)}
            continue
        backend = cls(model.tokenizer, model.vocab_size, args.compact)
        meta = library_info(cls)
        try:
            _, meta["setup_ms"] = timed(backend.setup)
            meta["setup_ms"] = round(meta["setup_ms"], 1)
        except Exception as exc:
            print(f"skip {lib}: tokenizer set-up failed ({short_error(exc, 200)})")
            traceback.print_exc()
            meta["skipped"] = short_error(exc)
            libs_meta[lib] = meta
            continue
        meta["apply"] = cls.apply_note
        libs_meta[lib] = meta
        backends.append(backend)
        print(f"{lib} {meta.get('version')}: tokenizer set-up {meta['setup_ms']:.0f} ms; needs {meta.get('requires')}")

    # Warm the model once so the first library does not pay for lazy initialisation.
    model.forward(model.prompt_ids(schemas[0][1]), None)

    machine = cpu_info()  # load average at the start
    started = time.perf_counter()
    per_key: dict[tuple[str, str], list[RunResult]] = {}
    for rep in range(args.repeats):
        for name, schema in schemas:
            order = backends if rep % 2 == 0 else list(reversed(backends))
            for backend in order:
                res = run_one(backend, model, name, schema, args)
                per_key.setdefault((backend.name, name), []).append(res)
                state = "refused" if not res.accepted else f"{res.tokens} tok, valid={res.valid}, {res.stop_reason}"
                print(f"[{rep}] {backend.name:<19} {name:<24} {state}", flush=True)
    results = [merge_repeats(per_key[(b.name, n)]) for b in backends for n, _ in schemas]
    elapsed = time.perf_counter() - started

    kernels = [] if args.no_kernels else bench_kernels(backends, model.vocab_size)

    print()
    print_table(results)
    if kernels:
        print(f"\napply-bitmask helpers on [1, {model.vocab_size}] fp32 logits:")
        for row in kernels:
            print(f"  {row['kernel']:<72} {json.dumps({k: v for k, v in row.items() if k != 'kernel'})}")
    summary = summarize(results, [b.name for b in backends])
    print("\nsummary:")
    for lib, row in summary.items():
        print(f"  {lib:<19} {json.dumps(row)}")

    payload = {
        "meta": {
            **machine,
            "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "model": args.model,
            "model_config_vocab_size": int(model.model.config.vocab_size),
            "tokenizer_len": len(model.tokenizer),
            "logits_width": model.vocab_size,
            "eos_token_id": model.tokenizer.eos_token_id,
            "args": vars(args),
            "decode_seconds": round(elapsed, 1),
            "prompt": PROMPT,
            "timing_notes": "mask_us = fill + apply + advance per token (µs); forward_ms_per_token = model decode step",
        },
        "libraries": libs_meta,
        "summary": summary,
        "kernels": kernels,
        "results": [asdict(r) for r in results],
        "schemas": dict(schemas),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
