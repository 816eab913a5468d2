"""Server: what one ``prefixflow serve`` process holds (the frozen base, the engine thread, the prefix bank, keys,
limits, metrics) and how a request becomes engine rows and text. ``app.py`` puts HTTP routes over it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from prefix_core.decode_engine import StepOutput
from prefix_core.sampling import SamplingParams
from prefixflow.services import registry
from prefixflow.services.usage_log import UsageLog
from prefixflow.serving.bank import BASE, ModelAccessError, Prefix, PrefixBank, PrefixUnusable, UnknownModel
from prefixflow.serving.canary_watch import CanaryPolicy, CanaryWatch
from prefixflow.serving.engine_loop import EngineLoop, Overloaded, Row
from prefixflow.serving.keys import Caller, KeyStore
from prefixflow.serving.metrics import ServerMetrics
from prefixflow.serving.openai_api import FINISH, APIError, logprobs_body
from prefixflow.serving.serve_config import ServeConfig

# Deferred imports: torch, prefix_core and starlette are deferred to the calls: the CLI validates a ServeConfig before
# loading them.

log = logging.getLogger(__name__)


EngineFactory = Callable[..., object]  # (base, tokenizer, config) -> an engine with DecodeEngine's interface


def decode_engine(base, tokenizer, config: ServeConfig):
    from prefix_core import DecodeEngine

    # its own tokenizer: the engine thread decodes for stop strings while handlers tokenize
    return DecodeEngine(base, copy.deepcopy(tokenizer), max_batch=config.max_batch,
                        max_prefill_rows=config.max_prefill_rows, prefill_chunk=config.prefill_chunk,
                        kv_cache_mb=config.kv_cache_mb)


class _RateLimiter:
    """A token bucket per key: ``rate`` requests per second, bursts up to ``max(1, rate)``."""

    def __init__(self, rate: float) -> None:
        self.rate, self.burst = rate, max(1.0, rate)
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, key_id: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(key_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            retry = max(1, math.ceil((1 - tokens) / self.rate))
            raise APIError(429, f"rate limit of {self.rate:g} requests per second for this key reached; retry after "
                                f"{retry} s", code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
        self._buckets[key_id] = (tokens - 1, now)


@dataclass
class Choice:
    """The text of one generated row as it grows. The engine decides when a stop sequence ended the row (the one
    place they are searched); the text is then cut before it (OpenAI's semantics). While the row runs, the tail
    that could still become a stop sequence (or an incomplete UTF-8 character) is held back."""

    tokenizer: object
    stops: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters already emitted
    finish: str | None = None
    scores: list[tuple[float, list[tuple[str, float]]]] = field(default_factory=list)  # per token, with logprobs
    pieces: list[str] = field(default_factory=list)  # each scored token's text: what it added to the decoded text
    scores_sent: int = 0  # of them already emitted in a stream chunk
    decoded: int = 0  # characters of the whole decoded text before the newest token

    def add(self, out: StepOutput) -> str:
        """Add a token (and its log-probabilities, when asked for); returns the new text that can be emitted."""
        finished, reason = out.finished, out.finish_reason
        self.ids.append(out.token_id)
        text = self._decoded(cut=False)
        if out.logprob is not None:  # alternatives: each decoded alone (a token's text may depend on the ones before)
            self.scores.append((out.logprob, [(self.tokenizer.decode([t]), v) for t, v in out.top_logprobs]))
            self.pieces.append(text[self.decoded:])
        self.decoded = len(text)
        if finished and reason == "stop":
            text = self._decoded(cut=True)
        if finished:
            self.finish = FINISH.get(reason or "stop", "stop")
        else:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
        new = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return new

    def logprobs(self, chat: bool, new: bool = False) -> dict | None:
        """OpenAI's ``logprobs`` of the choice (None when not asked for); ``new``: only of the tokens not yet sent
        in a stream chunk (and mark them sent)."""
        if not self.scores:
            return None
        start = self.scores_sent if new else 0
        if new:
            self.scores_sent = len(self.scores)
        return logprobs_body(self.pieces[start:], self.scores[start:], chat, sum(map(len, self.pieces[:start])))

    @property
    def text(self) -> str:
        """The whole text so far (cut before the stop sequence that ended it)."""
        return self._decoded(cut=self.finish == "stop")

    def _decoded(self, cut: bool) -> str:
        """The decoded text; with ``cut``, up to the first stop sequence in it."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0] if cut else []
        return text[: min(found)] if found else text


class Server:
    """One process's serving state. ``start()`` loads the base in a thread; ``ready`` is set when it is loaded
    (``load_error`` holds why it could not be)."""

    def __init__(self, config: ServeConfig, engine_factory: EngineFactory | None = None,
                 keys: KeyStore | None = None) -> None:
        self.config = config
        self.engine_factory = engine_factory or decode_engine
        self.keys = keys if keys is not None else KeyStore.load(config.keys_file)
        self.metrics = ServerMetrics()
        self.usage_log = UsageLog(config.usage_dir, config.usage_flush_s) if config.usage_dir is not None else None
        self.limiter = _RateLimiter(config.rate_limit)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.on_fatal: Callable[[], None] = lambda: None
        self.base = self.tokenizer = self.bank = self.loop = self.canaries = None
        self.base_name = config.base
        self._structured = None  # serving.structured.StructuredOutput, made at the first response_format
        self._structured_lock = threading.Lock()
        self._listing: tuple[float, list | None] = (0.0, None)
        self._listing_lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.usage_log is not None:
            self.usage_log.start()
        threading.Thread(target=self._load, name="load-base", daemon=True).start()

    def _load(self) -> None:
        from prefix_core import PrefixError, load_base_model
        from prefix_core.precision import decide

        started = time.monotonic()
        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)
        try:
            device = self.config.torch_device
            chosen = decide(self.config.precision, device)
            base, tokenizer = load_base_model(self.config.base, dtype=chosen.dtype, device=device)
            engine = self.engine_factory(base, tokenizer, self.config)
        except (PrefixError, ValueError, OSError) as err:
            self.load_error = f"cannot load base model {self.config.base!r}: {err}"
            log.error(self.load_error)
            self.on_fatal()
            return
        except Exception as err:  # never a server that stays up and is never ready
            self.load_error = f"cannot load base model {self.config.base!r}: {type(err).__name__}: {err}"
            log.error(self.load_error)
            self.on_fatal()
            return
        self.base, self.tokenizer = base, tokenizer
        self.bank = PrefixBank(base, max_bytes=int(self.config.bank_mb * 2**20), refresh_s=self.config.refresh_s,
                               on_event=self._bank_event, host_max_bytes=int(self.config.host_mb(device) * 2**20))
        self.canaries = CanaryWatch(self.metrics, self.bank, CanaryPolicy(self.config.canary_error_margin,
                                                                          self.config.canary_min_requests))
        self.loop = EngineLoop(engine, self.metrics, self.config.max_queued, self.config.client_max_running,
                               self.config.client_max_queued)
        self.loop.start()
        self.bank.start()
        self.ready.set()
        threading.Thread(target=self._preload, name="preload", daemon=True).start()
        log.info("base %s loaded in %.1f s on %s (%s); serving", self.config.base, time.monotonic() - started,
                 device, chosen.reason)
        if hasattr(engine, "max_columns"):
            log.info("KV memory: %d rows of up to %d tokens (prompt + max_tokens) in %g MB; prefill in chunks of %d "
                     "tokens", self.config.max_batch, engine.max_columns, self.config.kv_cache_mb, engine.prefill_chunk)

    def _preload(self) -> None:
        """Fill the bank with ``config.preload`` and then the most used models of the usage log's last 7 days
        (``config.preload_top`` of them), while requests are already served."""
        from prefixflow.services.usage_log import most_used_models

        wanted = list(self.config.preload)
        if self.config.preload_top and self.config.usage_dir is not None:
            try:
                used = most_used_models(self.config.usage_dir, time.time() - 7 * 86400, self.config.preload_top)
            except OSError as err:
                log.warning("usage log %s not read for preloading: %s", self.config.usage_dir, err)
                used = []
            wanted += [m for m in used if m not in wanted]
        if not wanted:
            return
        started = time.monotonic()
        done = self.bank.preload(wanted)
        log.info("preloaded %d of %d prefixes in %.1f s (%d MB in the bank)", done, len(wanted),
                 time.monotonic() - started, self.bank.nbytes >> 20)

    def stop(self) -> None:
        if self.bank is not None:
            self.bank.stop()
        if self.loop is not None:
            self.loop.stop()
        if self.usage_log is not None:
            self.usage_log.stop()  # its last counts

    def count_usage(self, client: str, requests: int = 0, prompt_tokens: int = 0, completion_tokens: int = 0,
                    model: str | None = None) -> None:
        """What ``client`` used (through ``model``, as the request named it): into ``/metrics`` (label ``client``)
        and the usage log."""
        self.metrics.client_usage(client, requests, prompt_tokens, completion_tokens)
        if self.usage_log is not None:
            self.usage_log.add(client, requests, prompt_tokens, completion_tokens, model=model)

    def _bank_event(self, kind: str, amount: int) -> None:
        self.metrics.bank_event(kind, amount)
        if self.bank is not None:
            self.metrics.prefixes_loaded.set(len(self.bank.loaded))
            self.metrics.bank_bytes.set(self.bank.nbytes)
            count, nbytes = self.bank.host
            self.metrics.host_prefixes.set(count)
            self.metrics.host_bytes.set(nbytes)

    def check_ready(self) -> None:
        if not self.ready.is_set():
            raise APIError(503, self.load_error or "the base model is still loading; retry in a few seconds",
                           headers={"Retry-After": "5"})

    # --- who may do what --------------------------------------------------------------------------------------
    def caller(self, authorization: str | None) -> Caller:
        key = None
        if authorization:
            scheme, _, token = authorization.partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        caller = self.keys.identify(key)
        if caller is None:
            raise APIError(401, "missing or unknown API key: send it as `Authorization: Bearer KEY`"
                           if key else "missing API key: send it as `Authorization: Bearer KEY`",
                           code="invalid_api_key")
        self.limiter.check(caller.key_id)
        return caller

    def registered_models(self) -> list:
        """Every registered model (``registry.all_models``), read at most once per ``refresh_s`` seconds however
        many callers list them (``/v1/models`` with a thousand models: one registry read, not one per call);
        ``refresh_s`` 0: read at every call."""
        with self._listing_lock:
            read_at, models = self._listing
            if models is None or time.monotonic() - read_at >= self.config.refresh_s:
                models = sorted(registry.all_models(), key=lambda m: m.name)
                self._listing = (time.monotonic(), models)
            return models

    async def constraint(self, response_format: dict):
        """The per-request constraint factory of a ``response_format`` (compiled in a worker thread, cached); a
        format that cannot be honoured is a 400 saying why."""
        from starlette.concurrency import run_in_threadpool

        from prefixflow.serving.structured import StructuredOutput, StructuredOutputError

        def compile_format():
            with self._structured_lock:
                if self._structured is None:
                    self._structured = StructuredOutput(self.tokenizer, self.base.config.get_text_config().vocab_size)
            return self._structured.constraint(response_format)

        try:
            return await run_in_threadpool(compile_format)
        except StructuredOutputError as err:
            raise APIError(400, str(err), param="response_format") from None

    async def prefix_for(self, model: str, caller: Caller, user: str | None = None) -> Prefix | None:
        """The bank entry a request uses (None: the bare base; ``user``: the request's OpenAI ``user``, which keeps
        a user on one side of a canary); errors as OpenAI-shaped HTTP errors."""
        from starlette.concurrency import run_in_threadpool

        from prefix_core.errors import PrefixError

        try:
            return await run_in_threadpool(self.bank.resolve, model, None if caller.is_admin else caller.client, user)
        except ModelAccessError as err:
            raise APIError(403, str(err), param="model", code="model_not_permitted") from None
        except UnknownModel as err:
            raise APIError(404, str(err), param="model", code="model_not_found") from None
        except PrefixUnusable as err:
            raise APIError(400, str(err), param="model", code="prefix_unusable") from None
        except PrefixError as err:  # not a model name
            raise APIError(400, f"model {model!r}: {err}; or {BASE!r} for the base model without a prefix",
                           param="model", code="model_not_found") from None

    # --- generation -------------------------------------------------------------------------------------------
    def rows(self, prompts: list[list[int]], n: int, prefix: Prefix | None, params: SamplingParams, rid: str,
             client: str = "-") -> list[Row]:
        """``n`` rows per prompt, in choice-index order (prompt i, choice j -> index i * n + j), choice i seeded
        ``seed + i`` when the request has a seed; ``client``: whose share of the server they use."""
        loop = asyncio.get_running_loop()
        out = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                index = i * n + j
                seeded = params if params.seed is None else replace(params, seed=params.seed + index)
                out.append(Row(f"{rid}-{index}", ids, prefix, seeded, loop, client=client))
        return out

    async def admit(self, rows: list[Row]) -> None:
        """Submit rows and wait until the engine accepted all of them (400 with the reason if it refused one;
        429 when the queue is full: then nothing was admitted)."""
        try:
            self.loop.submit(rows)
        except Overloaded as err:
            self.metrics.rejected.labels("overloaded").inc()
            raise APIError(429, str(err), code="server_overloaded",
                           headers={"Retry-After": str(err.retry_after)}) from None
        for row in rows:
            kind, payload = await row.events.get()
            if kind != "accepted":
                self.loop.cancel([r.id for r in rows])
                raise APIError(400, str(payload), code="invalid_request")

    async def tokens(self, rows: list[Row]) -> AsyncIterator[tuple[int, object]]:
        """``(choice index, StepOutput)`` as they come, until every row finished. Cancels the rows that have not
        finished if the consumer stops early (the client went away)."""
        merged: asyncio.Queue = asyncio.Queue()
        open_rows = set(range(len(rows)))

        async def forward(i: int, row: Row) -> None:
            while True:
                item = await row.events.get()
                await merged.put((i, item))
                if item[0] == "error" or (item[0] == "token" and item[1].finished):
                    return

        tasks = [asyncio.create_task(forward(i, r)) for i, r in enumerate(rows)]
        try:
            while open_rows:
                i, (kind, payload) = await merged.get()
                if kind == "error":
                    raise APIError(500, str(payload), code="generation_failed")
                if payload.finished:
                    open_rows.discard(i)
                yield i, payload
        finally:
            for t in tasks:
                t.cancel()
            if open_rows:
                self.loop.cancel([rows[i].id for i in open_rows])
                self.metrics.cancelled.inc()

    @staticmethod
    def request_id(chat: bool) -> str:
        return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
