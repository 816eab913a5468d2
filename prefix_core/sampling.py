"""How a request's tokens are chosen and when it ends: ``SamplingParams`` (one object carried from the API request
to the engine, as vLLM's), the sampler, and the one place stop tokens and stop strings are checked."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


class TokenConstraint(Protocol):
    """One request's constraint on the tokens it may generate (e.g. a JSON-schema grammar); the engine holds one
    per request. ``mask(logits)``: set the logits ``[V]`` (float32) of every token it forbids next to ``-inf``, in
    place. ``accept(token)``: advance by the chosen token; True when the constrained output is complete (the
    request then ends with ``"stop"``)."""

    def mask(self, logits: torch.Tensor) -> None: ...

    def accept(self, token: int) -> bool: ...


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy; otherwise softmax sampling at that temperature with nucleus ``top_p``, from
    a generator seeded with ``seed`` (``None``: drawn from torch's global RNG when the request is queued).
    ``stop_token_ids`` and ``stop`` (strings searched in the decoded generated text) end the request like EOS; the
    token that completes a stop is emitted. ``ignore_eos``: EOS does not end the request (vLLM's option: load tests
    that must do the same work per request). ``logprobs``: report each token's log-probability under the model
    (the log-softmax of its logits, before temperature and top_p) and that many most likely alternatives (None:
    none). ``constraint``: makes a ``TokenConstraint`` for the request when it is queued (None: none); tokens are
    then chosen among those it allows (logprobs stay the model's)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    constraint: Callable[[], TokenConstraint] | None = None

    @classmethod
    def of(cls, *, stop: str | Sequence[str] = (), stop_token_ids: Sequence[int] = (), **fields) -> SamplingParams:
        """Build from loose values: one stop string or several (empty ones dropped), any sequence of stop ids."""
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        return cls(stop=tuple(s for s in stop if s), stop_token_ids=frozenset(int(t) for t in stop_token_ids),
                   **fields)

    def check(self, request_id: Hashable) -> None:
        """ValueError saying which parameter is out of range."""
        if self.max_new_tokens < 1:
            raise ValueError(f"request {request_id!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"request {request_id!r}: logprobs must be >= 0, got {self.logprobs}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"request {request_id!r}: need temperature >= 0 and 0 < top_p <= 1, "
                             f"got {self.temperature} and {self.top_p}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own RNG (None when greedy)."""
        if self.temperature == 0:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch.randint(0, 2**62, ()).item()) if self.seed is None else self.seed)
        return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from ``logits [V]`` (float32) under ``params``."""
    if params.temperature == 0:
        return int(logits.argmax().item())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if not torch.isfinite(probs).all():  # a temperature so small that it divides to infinity: greedy
        return int(logits.argmax().item())
    probs, order = probs.sort(descending=True)
    if params.top_p < 1:  # the smallest set reaching top_p, never empty (a top_p that rounds to 0 keeps the top-1)
        keep = (probs.cumsum(-1) - probs) < params.top_p
        keep[..., 0] = True
        probs = probs * keep
    return int(order[torch.multinomial(probs, 1, generator=generator)].item())


def logprobs(logits: torch.Tensor, token: int, top: int | None) -> tuple[float | None, tuple[tuple[int, float], ...]]:
    """``(log-probability of token, ((id, log-probability) of the top ``top`` tokens))`` from ``logits [V]``
    (float32); ``(None, ())`` when ``top`` is None."""
    if top is None:
        return None, ()
    logp = torch.log_softmax(logits, dim=-1)
    if not top:
        return float(logp[token]), ()
    values, ids = logp.topk(min(top, logp.shape[-1]))
    return float(logp[token]), tuple(zip(ids.tolist(), values.tolist(), strict=True))


class StopCheck:
    """Whether a request ends after its newest token: ``"eos"``, ``"stop"`` (a stop token or string), ``"length"``
    or None. Stop strings are searched once per token, in the text decoded since the last search (plus the
    longest stop's length, so a stop spanning two tokens is found)."""

    def __init__(self, params: SamplingParams, eos_token_ids: frozenset[int], tokenizer=None) -> None:
        self.params, self.eos, self.tokenizer = params, eos_token_ids, tokenizer
        self._checked_chars = 0

    def __call__(self, generated: list[int]) -> str | None:
        token, params = generated[-1], self.params
        if token in self.eos and not params.ignore_eos:
            return "eos"
        if token in params.stop_token_ids:
            return "stop"
        if params.stop:
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            start = max(0, self._checked_chars - max(len(s) for s in params.stop) + 1)
            self._checked_chars = len(text)
            if any(s in text[start:] for s in params.stop):
                return "stop"
        if len(generated) >= params.max_new_tokens:
            return "length"
        return None
