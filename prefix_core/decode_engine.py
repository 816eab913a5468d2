"""DecodeEngine: continuous batching of requests with different prefixes over one frozen decoder-only base.

Requests join and leave a running batch between steps whatever their prefix (or none) and prompt length; each
``step()`` gives every decoding row one new token and prefills up to ``prefill_chunk`` prompt tokens.

The parts (vLLM's shape): :mod:`~prefix_core.scheduler` (one waiting queue, slots, what a step computes),
:mod:`~prefix_core.model_runner` (the forwards), :mod:`~prefix_core.kv_slots` (the KV memory: a slot per row
written in place, each prefix stored once in a pool shared by the rows that use it),
:mod:`~prefix_core.slot_attention` (attention over prefix and slot without concatenating them) and
:mod:`~prefix_core.sampling` (``SamplingParams``, the sampler, the stop check). What a step costs: a decode forward
reads each row's own columns once and writes one column per row; nothing of the cache is copied, moved or
rebuilt when rows join or leave. The KV memory (``kv_cache_mb``) is split into ``max_batch`` slots; it is
allocated as rows need it (doubling, between steps) and never beyond the budget.

Not thread-safe: one driver loop calls ``add``/``cancel``/``step``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import UnsupportedModelError
from .geometry import geometry_from_config
from .kv_slots import PrefixPool, SlotCache
from .model import attach
from .model_runner import ModelRunner
from .prefix_forms import fold_prefix
from .sampling import SamplingParams, StopCheck, logprobs, sample
from .scheduler import Scheduler, Sequence

_SUPPORTED_ATTN = {"sdpa", "eager", "prefixflow_sdpa", "prefixflow_eager"}
_SUPPORTED_LAYERS = {"full_attention", "sliding_attention"}
_FIRST_COLUMNS = 256  # columns allocated per slot at first; doubled as rows need more


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings.

    ``max_batch``: rows (slots) decoding together at most; further requests wait in FIFO order for a free slot.
    ``max_prefill_rows``: new rows admitted per step; ``None``: as many as there are free slots.
    ``prefill_chunk``: prompt tokens prefilled per step at most (a longer prompt takes several steps); ``None``:
    ``2 x max_batch`` on a CPU (where a token of prefill costs about what a row's decode step does, so a chunk
    costs about two steps of a full batch and a running row's gap between tokens stays within about 3x), 512 on a
    GPU (where a decode step is bound by memory and a chunk of prefill costs little beside it).
    ``kv_cache_mb``: KV memory for the rows' own tokens (prefixes are stored apart), split evenly between the
    ``max_batch`` slots: it sets the longest prompt + ``max_new_tokens`` a request may have.
    ``eos_token_ids``: tokens that end a request (``"eos"``); ``None``: the model's generation config, else its
    config, else the tokenizer's EOS.
    """

    max_batch: int = 8
    max_prefill_rows: int | None = None
    prefill_chunk: int | None = None
    kv_cache_mb: float = 2048.0
    eos_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_prefill_rows is not None and self.max_prefill_rows < 1:
            raise ValueError(f"max_prefill_rows must be >= 1 or None, got {self.max_prefill_rows}")
        if (self.prefill_chunk is not None and self.prefill_chunk < 1) or self.kv_cache_mb <= 0:
            raise ValueError(f"prefill_chunk must be >= 1 and kv_cache_mb > 0, got {self.prefill_chunk} and "
                             f"{self.kv_cache_mb}")


@dataclass(frozen=True)
class StepOutput:
    """One new token of one request. ``index``: its index among the request's generated tokens (0 = first).
    ``finish_reason`` (when ``finished``): ``"eos"``, ``"stop"`` (a stop token or stop string; the token that
    completed it is included) or ``"length"`` (``max_new_tokens`` reached). With ``SamplingParams.logprobs``:
    ``logprob`` (the token's log-probability under the model) and ``top_logprobs`` (``(token id, log-probability)``
    of the most likely tokens, most likely first)."""

    request_id: Hashable
    token_id: int
    index: int
    finished: bool
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class DecodeEngine:
    """Continuous-batching greedy/sampling decoder for requests with different prefixes.

    ``DecodeEngine(base, tokenizer, max_batch=8)`` (keyword options are ``EngineConfig`` fields; or pass
    ``config=EngineConfig(...)``). ``base``: a frozen decoder-only HF causal LM in eval mode with sdpa or eager
    attention (attached to prefix attention here, which leaves it usable bare). ``tokenizer``: used for ``str``
    prompts, stop strings and the EOS fallback; may be ``None`` without those.

    Contract: at temperature 0 each request's tokens equal generating it alone with ``PrefixModel.generate`` (or
    the bare base for no prefix), greedy, up to and including the first EOS, whatever joins or leaves the batch
    meanwhile and however its prompt is chunked (up to float rounding of batched attention). With
    ``temperature > 0`` a request samples from its own ``torch.Generator`` seeded by ``seed``, so the same request
    with the same seed gives the same tokens.
    """

    def __init__(self, base: nn.Module, tokenizer=None, config: EngineConfig | None = None, **options) -> None:
        self.config = replace(config or EngineConfig(), **options)
        cfg = base.config
        if getattr(cfg, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"DecodeEngine serves decoder-only models; {type(base).__name__} is an encoder-decoder model. "
                "Use MultiPrefixGenerator (or PrefixModel.generate) for encoder-decoder bases."
            )
        if cfg._attn_implementation not in _SUPPORTED_ATTN:
            raise UnsupportedModelError(
                f"DecodeEngine needs sdpa or eager attention, the base uses {cfg._attn_implementation!r}; load it "
                "with attn_implementation='sdpa'."
            )
        layer_types = set(getattr(cfg, "layer_types", None) or ())
        if layer_types - _SUPPORTED_LAYERS:
            raise UnsupportedModelError(
                f"{type(base).__name__} has layer types {sorted(layer_types - _SUPPORTED_LAYERS)}; DecodeEngine "
                "supports attention layers with a plain KV cache only."
            )
        if base.training:
            raise ValueError("the base model is in training mode (dropout on); call base.eval() first")
        attach(base)
        self.base, self.tokenizer = base, tokenizer
        self.geometry = geometry_from_config(cfg)
        param = next(base.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.sliding_window = getattr(cfg, "sliding_window", None)
        self.eos_token_ids = frozenset(self.config.eos_token_ids or self._default_eos())
        rows = self.config.max_batch
        per_column = SlotCache.bytes_per_column(self.geometry, self.dtype)
        self.max_columns = int(self.config.kv_cache_mb * 2**20) // (rows * per_column)
        if self.max_positions:
            self.max_columns = min(self.max_columns, self.max_positions)
        if self.max_columns < 1:
            raise ValueError(f"kv_cache_mb={self.config.kv_cache_mb} cannot hold one token in each of {rows} "
                             f"rows ({per_column} bytes per token); give it more memory or fewer rows")
        self.cache = SlotCache(self.geometry, rows, self.max_columns, self.dtype, self.device,
                               columns=_FIRST_COLUMNS)
        self.pool = PrefixPool(self.geometry, self.dtype, self.device, entries=2 * rows + 1)
        self.prefill_chunk = self.config.prefill_chunk or (2 * rows if self.device.type == "cpu" else 512)
        self.scheduler = Scheduler(rows, self.prefill_chunk, self.config.max_prefill_rows)
        self.runner = ModelRunner(base, self.cache, self.pool)
        self._preempted: dict[Hashable, Sequence] = {}

    # --- requests ---------------------------------------------------------------------------------------------
    def add(self, request_id: Hashable, prompt_ids: Seq[int] | torch.Tensor | str, prefix=None,
            params: SamplingParams | None = None, **fields) -> None:
        """Queue a request; it takes a slot at the next ``step()`` with a free one.

        ``prompt_ids``: token ids (list or 1D tensor), or a ``str`` tokenized with the tokenizer's defaults.
        ``prefix``: ``None``; a ``PrefixArtifact`` (checked against the base); a ``PrefixKV`` holding one prefix;
        per-site ``(keys, values)`` lists of ``[kv_heads, P, head_dim]``; a folded table ``[P, W]``; or a
        ``PrefixModel`` (its current prefix). ``params``: a ``SamplingParams``, or its fields as keywords
        (``max_new_tokens=``, ``temperature=``, ``top_p=``, ``stop=``, ``stop_token_ids=``, ``seed=``,
        ``ignore_eos=``).

        ``add`` of a preempted request's id queues that request again (the other arguments are not read).

        Raises ValueError for a duplicate id, an empty prompt, out-of-vocabulary ids, bad sampling parameters,
        or when prefix + prompt + ``max_new_tokens`` exceeds the model's positions (or its sliding window) or
        prompt + ``max_new_tokens`` the KV memory of a row.
        """
        if request_id in self._preempted:  # admitted again: it goes on where it stopped
            self.scheduler.queue(self._preempted.pop(request_id))
            return
        if self.scheduler.find(request_id) is not None:
            raise ValueError(f"request {request_id!r} is already queued or running")
        prompt, keys, values, params = self.validate(request_id, prompt_ids, prefix, params, **fields)
        self.scheduler.queue(Sequence(request_id, prompt, keys, values, params, params.generator(self.device),
                                      StopCheck(params, self.eos_token_ids, self.tokenizer),
                                      constraint=params.constraint() if params.constraint else None))

    def validate(self, request_id: Hashable, prompt_ids: Seq[int] | torch.Tensor | str, prefix=None,
                 params: SamplingParams | None = None, **fields
                 ) -> tuple[list[int], list | None, list | None, SamplingParams]:
        """The checks of :meth:`add` without queueing (a caller that queues requests itself checks them on
        arrival): ``(prompt ids, prefix keys, prefix values, params)``; ValueError saying what is wrong."""
        params = params or SamplingParams.of(**fields)
        prompt = self._prompt_ids(prompt_ids)
        if not prompt:
            raise ValueError(f"request {request_id!r}: the prompt is empty; give at least one token")
        vocab = self.base.config.get_text_config().vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"request {request_id!r}: prompt token ids must be in [0, {vocab})")
        params.check(request_id)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: stop strings need the tokenizer: DecodeEngine(base, tokenizer)")
        keys, values = fold_prefix(prefix, self.base, self.geometry, self.dtype, self.device)
        p, n = (0 if keys is None else keys[0].shape[1]), params.max_new_tokens
        total = p + len(prompt) + n
        if self.max_positions and total > self.max_positions:
            raise ValueError(
                f"request {request_id!r} is too long: prefix ({p}) + prompt ({len(prompt)}) + max_new_tokens "
                f"({n}) = {total} positions, but the model has {self.max_positions} "
                "(max_position_embeddings). Shorten the prompt or lower max_new_tokens."
            )
        if self.sliding_window and total > self.sliding_window:
            raise ValueError(
                f"request {request_id!r}: {total} positions exceed the model's sliding window "
                f"({self.sliding_window}); DecodeEngine does not support sequences longer than the window."
            )
        if len(prompt) + n > self.max_columns:
            raise ValueError(
                f"request {request_id!r} is too long for the KV memory: prompt ({len(prompt)}) + max_new_tokens "
                f"({n}) = {len(prompt) + n} tokens, but a row holds {self.max_columns} ({self.config.kv_cache_mb:g} "
                f"MB over {self.config.max_batch} rows). Shorten the prompt, lower max_new_tokens, or give the "
                "engine more KV memory (kv_cache_mb; prefixflow serve --kv-cache-mb)."
            )
        return prompt, keys, values, params

    def cancel(self, request_id: Hashable) -> bool:
        """Drop a queued, running or preempted request (its slot is freed now). False for an unknown id."""
        if self._preempted.pop(request_id, None) is not None:
            return True
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        if seq.slot is None:
            self.scheduler.waiting.remove(seq)
        else:
            self._end(seq)
        return True

    def preempt(self, request_id: Hashable) -> bool:
        """Take a running request out of its slot (freed now; its cached keys/values are dropped) and keep it until
        ``add`` with its id queues it again: then its prompt and the tokens it generated are prefilled anew and it
        goes on where it stopped (the same tokens at temperature 0). False when it is not running."""
        seq = self.scheduler.find(request_id)
        if seq is None or seq.slot is None:
            return False
        self._end(seq)
        seq.cached = 0
        self._preempted[request_id] = seq
        return True

    @property
    def num_active(self) -> int:
        """Rows holding a slot (prefilling or decoding)."""
        return len(self.scheduler.running)

    @property
    def active_ids(self) -> list[Hashable]:
        """Ids of the rows holding a slot, in slot order."""
        return [s.request_id for s in self.scheduler.running]

    @property
    def num_pending(self) -> int:
        """Requests waiting for a free slot."""
        return len(self.scheduler.waiting)

    @property
    def has_work(self) -> bool:
        """Whether any request is queued or running."""
        return bool(self.scheduler.waiting or self.scheduler.running)

    def cached_kv(self, request_id: Hashable) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A running row's own cached keys/values, per layer ``([kv_heads, n, head_dim], same)`` (views of its slot;
        ``n`` = prompt tokens prefilled + generated tokens fed back). Its prefix is in ``prefix_entry``."""
        seq = self._running(request_id)
        return self.cache.row(seq.slot, seq.cached)

    def prefix_entry(self, request_id: Hashable) -> int:
        """The ``pool`` entry holding a running row's prefix (0: none); rows with one prefix share one entry."""
        return self._running(request_id).entry

    # --- stepping ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, emit: Callable[[list[StepOutput]], None] | None = None) -> list[StepOutput]:
        """Admit waiting requests into free slots and prefill up to ``prefill_chunk`` context tokens (a row whose
        prompt is now complete gives its first token), then one decode forward for the rows that had their first
        token before this step. Finished rows leave before this returns. ``emit``: called with each forward's new
        tokens as soon as they are chosen, so a new row's first token goes out before the decode forward runs.
        Returns every new token of the step: first tokens, then the decoding rows' (slot order)."""
        decode = [s for s in self.scheduler.running if not s.prefilling]
        outputs = self._prefill()
        if emit is not None and outputs:
            emit(outputs)
        if decode:
            decoded = self._emit(decode, self.runner.decode(decode))
            if emit is not None:
                emit(decoded)
            outputs += decoded
        return outputs

    def _prefill(self) -> list[StepOutput]:
        """Admission and this step's prefill chunks; the first tokens of the rows whose prompt they completed."""
        outputs: list[StepOutput] = []
        for seq in self.scheduler.admit():
            self.cache.reserve(seq.columns)
            seq.entry = self.pool.acquire(seq.keys, seq.values)
        plan = self.scheduler.plan()
        if plan.continuing is not None:  # a row whose context is now complete gives its first token (a row that
            seq, n = plan.continuing       # was preempted has it already: it decodes from the next step)
            logits = self.runner.resume(seq, n)
            if not seq.prefilling and not seq.generated:
                outputs += self._emit([seq], logits)
        if plan.starting:
            logits = self.runner.start(plan.starting)
            done = [i for i, (s, _) in enumerate(plan.starting) if not s.prefilling and not s.generated]
            outputs += self._emit([plan.starting[i][0] for i in done], logits[done])
        return outputs

    def run(self) -> dict[Hashable, list[int]]:
        """Step until every queued and running request has finished; returns the tokens of each."""
        tokens: dict[Hashable, list[int]] = {}
        while self.has_work:
            for out in self.step():
                tokens.setdefault(out.request_id, []).append(out.token_id)
        return tokens

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        """Choose each row's token from ``logits [n, V]`` (among those its constraint allows); a row that finished
        leaves its slot."""
        greedy = logits.argmax(-1).tolist()
        outputs = []
        for i, seq in enumerate(seqs):
            row, complete = logits[i], False
            if seq.constraint is not None:
                row = row.clone()
                seq.constraint.mask(row)
                greedy[i] = int(row.argmax())
            token = greedy[i] if seq.params.temperature == 0 else sample(row, seq.params, seq.generator)
            seq.generated.append(token)
            if seq.constraint is not None:
                complete = seq.constraint.accept(token)
            reason = seq.stop(seq.generated)
            if complete and reason in (None, "length"):
                reason = "stop"
            outputs.append(StepOutput(seq.request_id, token, len(seq.generated) - 1, reason is not None, reason,
                                      *logprobs(logits[i], token, seq.params.logprobs)))
            if reason is not None:
                self._end(seq)
        return outputs

    def _end(self, seq: Sequence) -> None:
        self.pool.release(seq.entry)
        self.scheduler.release(seq)

    def _running(self, request_id: Hashable) -> Sequence:
        seq = self.scheduler.find(request_id)
        if seq is None or seq.slot is None:
            raise KeyError(f"request {request_id!r} is not running")
        return seq

    # --- inputs -----------------------------------------------------------------------------------------------
    def _default_eos(self) -> list[int]:
        gen = getattr(self.base, "generation_config", None)
        for eos in (getattr(gen, "eos_token_id", None), self.base.config.get_text_config().eos_token_id,
                    getattr(self.tokenizer, "eos_token_id", None)):
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
        return []

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a str prompt needs the tokenizer: DecodeEngine(base, tokenizer)")
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 and not (prompt.dim() == 2 and prompt.shape[0] == 1):
                raise ValueError(f"prompt_ids must be 1D (or [1, T]), got shape {tuple(prompt.shape)}")
            return prompt.reshape(-1).tolist()
        return [int(x) for x in prompt]
