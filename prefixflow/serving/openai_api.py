"""The OpenAI API surface the server speaks: request bodies (validated, unknown fields refused), the error shape,
and the objects and stream chunks of ``/v1/completions`` and ``/v1/chat/completions``.

Parameters the engine cannot honour are accepted only at their neutral value (``echo: false``,
``presence_penalty: 0``, ...) and refused otherwise, with a message saying so, rather than silently ignored.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefix_core.sampling import SamplingParams

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # engine reason -> OpenAI finish_reason


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
        404: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
    }

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema", description="the JSON Schema the output "
                                                  "follows")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema`` (an output that
    follows the schema: see ``serving.structured`` for the keywords enforced)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema: the JSON Schema the "
                             "output must follow")
        return self

    def wire(self) -> dict:
        """As OpenAI spells it (``schema``, not ``schema_``)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description=(
        "base (the base model, no prefix), or a registered prefix: CLIENT/TASK@ALIAS, CLIENT/TASK/VERSION, "
        "models:/NAME@ALIAS or models:/NAME/VERSION"), examples=["acme/e2e@champion", "acme/e2e/3", "base"])
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension (``extra_body``): run to max_tokens past EOS, for load tests
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _neutral(self):
        unsupported = {"presence_penalty": self.presence_penalty != 0, "frequency_penalty": self.frequency_penalty != 0,
                       "logit_bias": bool(self.logit_bias)}
        for name, used in unsupported.items():
            if used:
                raise ValueError(f"{name} is not supported by prefixflow serve; leave it unset")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def sampling(self, max_tokens: int) -> SamplingParams:
        """The request's sampling, as the engine takes it (one object from here to the sampler)."""
        return SamplingParams(max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=self.stops, seed=self.seed, ignore_eos=self.ignore_eos,
                              logprobs=self.logprob_count)

    @property
    def logprob_count(self) -> int | None:
        """Alternatives to report per token with its log-probability (None: no log-probabilities)."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, token ids or lists of token ids. With a
    prefix that was trained with a prompt template, string prompts are the task input and are rendered through it
    (as ``prefixflow generate`` does)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5, description="log-probabilities of each token and of the "
                                 "`logprobs` most likely alternatives")
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.echo:
            raise ValueError("echo is not supported by prefixflow serve; leave it unset")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported by prefixflow serve; use n")
        if self.suffix:
            raise ValueError("suffix is not supported by prefixflow serve; leave it unset")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is empty")
        return self

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"message content of type {part.get('type')!r} is not supported; send text")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: the messages are rendered with the base model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="most likely alternatives per token (needs "
                                     "logprobs: true)")
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tools:
            raise ValueError("tools are not supported by prefixflow serve; leave them unset")
        for m in self.messages:
            m.text()  # refuses non-text parts here, as a 400
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line from pydantic's errors: ``(message, param)``."""
    first = errors[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = f"unrecognized request argument {param!r}; prefixflow serve follows the OpenAI API"
    elif first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    elif first.get("type") == "missing" and param is None:
        return "the request has no body: send a JSON object with model and prompt (or messages)", None
    elif first.get("type") == "missing":
        missing = [".".join(str(p) for p in e["loc"] if p != "body") for e in errors if e.get("type") == "missing"]
        names = " and ".join(repr(m) for m in missing)
        return f"missing required argument{'s' if len(missing) > 1 else ''} {names}", param
    elif param:
        msg = f"{param}: {msg}"
    return msg + (f" ({len(errors) - 1} more problem(s))" if len(errors) > 1 else ""), param


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, choices: list[tuple[str, str | None, dict | None]], use: dict,
               chat: bool) -> dict:
    """The whole response; ``choices``: ``(text, finish_reason, logprobs)`` in index order."""
    created = int(time.time())
    if chat:
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                             "finish_reason": fin} for i, (text, fin, lp) in enumerate(choices)], "usage": use}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": fin}
                        for i, (text, fin, lp) in enumerate(choices)], "usage": use}


def chunk(rid: str, model: str, index: int, text: str | None, finish: str | None, chat: bool,
          first: bool = False, logprobs: dict | None = None) -> str:
    """One server-sent event of a stream (``text`` None with ``first``: the chat role announcement)."""
    created = int(time.time())
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
    else:
        body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}]}
    return sse(body)


def logprobs_body(pieces: list[str], entries: list[tuple[float, list[tuple[str, float]]]], chat: bool,
                  offset: int = 0) -> dict:
    """OpenAI's ``logprobs`` object of a choice (or of a stream chunk): ``pieces`` the tokens' text, ``entries``
    each token's ``(log-probability, [(alternative's text, its log-probability), ...])``; ``offset``: characters of
    the completion before the first token (completions' ``text_offset``)."""
    if chat:
        return {"content": [{"token": piece, "logprob": lp, "bytes": list(piece.encode()),
                             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}
                            for piece, (lp, top) in zip(pieces, entries, strict=True)]}
    offsets = [offset + sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    return {"tokens": pieces, "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [dict(top) for _, top in entries] if any(top for _, top in entries) else None,
            "text_offset": offsets}


def usage_chunk(rid: str, model: str, use: dict, chat: bool) -> str:
    return sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model, "choices": [], "usage": use})


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
