"""DecodeEngine: continuous batching of requests with different prefixes over one frozen decoder-only base.

The decoding core of a future multi-prefix server (no HTTP, no scheduling policy beyond FIFO). Requests join
and leave a running batch between steps whatever their prefix (or none) and prompt length; ``step()`` gives
every active row one new token.

How the prefix reaches attention here: unlike ``PrefixModel``/``MultiPrefixGenerator`` (which pass the prefix
as a forward kwarg and concatenate it in front of the real keys/values at every attention call, every decode
step), the engine writes a row's prefix keys/values into that row's KV cache ONCE, at prefill. After that the
base runs as a plain cached decoder (no ``prefix_kv`` kwarg): decode steps do no prefix concatenation. The
numbers are the same because prefix keys are never rotated (they are stored as attention sees them) and real
tokens sit at positions ``P_row, P_row + 1, ...`` exactly as in ``PrefixModel``.

Cache layout (one ``transformers.DynamicCache`` for the batch, per layer keys/values ``[B, kv_heads, L, head_dim]``)::

    row 0:  0 0 0 [prefix_0 (P_0)] [prompt_0 (T_0)] [generated ...]      <- right-aligned
    row 1:  0 0 0 0 0 0 0 0 0 0 0 0 [prompt_1] [generated ...]           <- no prefix: P_1 = 0
    row 2:  [prefix_2 ...........] [prompt_2 ......] [generated ...]     <- the longest row: no padding

Each row's cached columns form one contiguous block at the right end (``length_r`` columns); the columns on its
left are zeros, masked out by the 2D attention mask ``mask[r, c] = c >= L - length_r``. ``L`` is the longest
row. A decode step feeds each row's last token at column ``L`` with position id ``length_r`` (= ``P_r`` + number
of real tokens before it), so every row keeps its own positions whatever the padding. When rows leave, their
cache rows are dropped and leading all-padding columns are trimmed; when rows join, the shorter side (the batch
or the new rows) is left-padded with zeros so the blocks stay right-aligned.

Prefill of newly admitted rows is a separate forward in the same step: a cache holding each new row's prefix
(left-padded to the longest new prefix) and the prompts right-padded (``[0.., prefix, prompt, pad..]``, so no
query row is ever fully masked), positions ``P_r + j``. The valid columns (prefix + prompt) of each row are
then cut out and merged into the batch cache, and each row's first token is sampled from its last prompt
position.

Cost model (what this simple version pays): a decode step is one forward over ``B`` query tokens against ``B x L``
cached columns, and ``DynamicCache`` appends by concatenation, so each step also copies the whole cache (as HF
``generate`` does). A join or a leave rebuilds the batch cache once (one more copy of it, with padding). Rows of
very different lengths waste ``B x (L - length_r)`` padded columns in memory and attention compute. Prefix
K/V are copied into every row that uses them (``P x W`` values per row; no sharing between rows). Sampling and
finish checks run in Python per row (cheap next to the forward); a request with stop strings decodes its
generated tokens once per step. Nothing here is preallocated, paged or compiled.

Not thread-safe: one driver loop calls ``add``/``cancel``/``step``.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from .artifact import PrefixArtifact
from .attention import PREFIX_IMPL, PrefixKV
from .encoder import table_to_kv
from .errors import UnsupportedModelError
from .geometry import geometry_from_config
from .model import PrefixModel

_SUPPORTED_ATTN = {*PREFIX_IMPL, *PREFIX_IMPL.values()}  # sdpa, eager and our prefix-aware versions of them
_SUPPORTED_LAYERS = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings.

    ``max_batch``: rows decoding together at most; further requests wait in FIFO order for a free row.
    ``max_prefill_rows``: new rows admitted (prefilled together) per step; ``None``: as many as there are free rows.
    ``eos_token_ids``: tokens that end a request (``"eos"``); ``None``: the model's generation config, else its
    config, else the tokenizer's EOS.
    """

    max_batch: int = 8
    max_prefill_rows: int | None = None
    eos_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_prefill_rows is not None and self.max_prefill_rows < 1:
            raise ValueError(f"max_prefill_rows must be >= 1 or None, got {self.max_prefill_rows}")


@dataclass(frozen=True)
class StepOutput:
    """One new token of one request. ``index``: its index among the request's generated tokens (0 = first).
    ``finish_reason`` (when ``finished``): ``"eos"``, ``"stop"`` (a stop token or stop string; the token that
    completed it is included) or ``"length"`` (``max_new_tokens`` reached)."""

    request_id: Hashable
    token_id: int
    index: int
    finished: bool
    finish_reason: str | None = None


@dataclass
class _Request:
    request_id: Hashable
    prompt: list[int]
    keys: list[torch.Tensor] | None  # per layer [kv_heads, P, head_dim] in the base dtype/device, or None
    values: list[torch.Tensor] | None
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_token_ids: frozenset[int]
    stop: tuple[str, ...]
    generator: torch.Generator | None
    ignore_eos: bool = False
    generated: list[int] = field(default_factory=list)
    length: int = 0  # columns this row holds in the batch cache (prefix + prompt + generated tokens fed back)
    checked_chars: int = 0  # decoded characters already searched for stop strings

    @property
    def prefix_len(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[1]


class DecodeEngine:
    """Continuous-batching greedy/sampling decoder for requests with different prefixes.

    ``DecodeEngine(base, tokenizer, max_batch=8)`` (keyword options are ``EngineConfig`` fields; or pass
    ``config=EngineConfig(...)``). ``base``: a frozen decoder-only HF causal LM in eval mode with sdpa or eager
    attention (plain or attached by ``PrefixModel``; the engine never passes prefix kwargs, so it does not care).
    ``tokenizer``: used for ``str`` prompts, stop strings and the EOS fallback; may be ``None`` without those.

    Contract: at temperature 0 each request's tokens equal generating it alone with ``PrefixModel.generate`` (or
    ``MultiPrefixGenerator`` with that one prefix, or the bare base for no prefix), greedy, up to and including
    the first EOS, whatever joins or leaves the batch meanwhile (up to float rounding of padded batched
    attention, as for ``MultiPrefixGenerator``). With ``temperature > 0`` a request samples from its own
    ``torch.Generator`` seeded by ``seed``, so the same request with the same seed gives the same tokens.
    """

    def __init__(self, base: nn.Module, tokenizer=None, config: EngineConfig | None = None, **options) -> None:
        self.config = replace(config or EngineConfig(), **options)
        cfg = base.config
        if getattr(cfg, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"DecodeEngine serves decoder-only models; {type(base).__name__} is an encoder-decoder model. "
                "Use MultiPrefixGenerator (or PrefixModel.generate) for encoder-decoder bases."
            )
        impl = cfg._attn_implementation
        if impl not in _SUPPORTED_ATTN:
            raise UnsupportedModelError(
                f"DecodeEngine needs sdpa or eager attention, the base uses {impl!r}; load it with "
                "attn_implementation='sdpa'."
            )
        layer_types = set(getattr(cfg, "layer_types", None) or ())
        if layer_types - _SUPPORTED_LAYERS:
            raise UnsupportedModelError(
                f"{type(base).__name__} has layer types {sorted(layer_types - _SUPPORTED_LAYERS)}; DecodeEngine "
                "supports attention layers with a plain KV cache only."
            )
        if base.training:
            raise ValueError("the base model is in training mode (dropout on); call base.eval() first")
        self.base = base
        self.tokenizer = tokenizer
        self.geometry = geometry_from_config(cfg)
        param = next(base.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.sliding_window = getattr(cfg, "sliding_window", None)
        self.eos_token_ids = frozenset(self.config.eos_token_ids or self._default_eos())
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._pending: deque[_Request] = deque()
        self._rows: list[_Request] = []  # active rows, in batch (cache) order
        self._cache: DynamicCache | None = None  # [B, kv_heads, L, head_dim] per layer, rows right-aligned

    # --- requests ---------------------------------------------------------------------------------------------
    def add(self, request_id: Hashable, prompt_ids: Sequence[int] | torch.Tensor | str, prefix=None, *,
            max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
            stop_token_ids: Sequence[int] = (), stop: Sequence[str] = (), seed: int | None = None,
            ignore_eos: bool = False) -> None:
        """Queue a request; it joins the batch at the next ``step()`` with a free row.

        ``prompt_ids``: token ids (list or 1D tensor), or a ``str`` tokenized with the tokenizer's defaults.
        ``prefix``: ``None``; a ``PrefixArtifact`` (checked against the base); a ``PrefixKV`` holding one prefix;
        per-site ``(keys, values)`` lists of ``[kv_heads, P, head_dim]``; a folded table ``[P, W]``; or a
        ``PrefixModel`` (its current prefix). ``temperature == 0`` is greedy; otherwise softmax sampling at that
        temperature with nucleus ``top_p``, from a generator seeded with ``seed`` (``None``: drawn from torch's
        global RNG at ``add``). ``stop_token_ids`` and ``stop`` (a string or strings, searched in the decoded
        generated text) end the request like EOS; the token that completes a stop is emitted. ``ignore_eos``: EOS
        does not end the request (it runs to ``max_new_tokens`` or a stop), as vLLM's option of that name: load
        tests that must do the same work per request whatever the text.

        Raises ValueError for a duplicate id, an empty prompt, out-of-vocabulary ids, bad sampling parameters,
        or when prefix + prompt + ``max_new_tokens`` exceeds the model's positions (or its sliding window).
        """
        if any(r.request_id == request_id for r in (*self._pending, *self._rows)):
            raise ValueError(f"request {request_id!r} is already queued or running")
        prompt, keys, values, stop = self.validate(request_id, prompt_ids, prefix, max_new_tokens=max_new_tokens,
                                                   temperature=temperature, top_p=top_p, stop=stop)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        self._pending.append(_Request(
            request_id, prompt, keys, values, max_new_tokens, float(temperature), float(top_p),
            frozenset(int(t) for t in stop_token_ids), tuple(s for s in stop if s), generator, bool(ignore_eos),
        ))

    def validate(self, request_id: Hashable, prompt_ids: Sequence[int] | torch.Tensor | str, prefix=None, *,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] = ()) -> tuple[list[int], list | None, list | None, tuple[str, ...]]:
        """The checks of :meth:`add` without queueing (a caller that queues requests itself checks them on
        arrival): ``(prompt ids, prefix keys, prefix values, stop strings)``; ValueError saying what is wrong."""
        prompt = self._prompt_ids(prompt_ids)
        if not prompt:
            raise ValueError(f"request {request_id!r}: the prompt is empty; give at least one token")
        vocab = self.base.config.get_text_config().vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"request {request_id!r}: prompt token ids must be in [0, {vocab})")
        if max_new_tokens < 1:
            raise ValueError(f"request {request_id!r}: max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"request {request_id!r}: need temperature >= 0 and 0 < top_p <= 1, "
                             f"got {temperature} and {top_p}")
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if stop and self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: stop strings need the tokenizer: DecodeEngine(base, tokenizer)")
        keys, values = self._fold_prefix(prefix)
        p = 0 if keys is None else keys[0].shape[1]
        total = p + len(prompt) + max_new_tokens
        if self.max_positions and total > self.max_positions:
            raise ValueError(
                f"request {request_id!r} is too long: prefix ({p}) + prompt ({len(prompt)}) + max_new_tokens "
                f"({max_new_tokens}) = {total} positions, but the model has {self.max_positions} "
                "(max_position_embeddings). Shorten the prompt or lower max_new_tokens."
            )
        if self.sliding_window and total > self.sliding_window:
            raise ValueError(
                f"request {request_id!r}: {total} positions exceed the model's sliding window "
                f"({self.sliding_window}); DecodeEngine does not support sequences longer than the window."
            )
        return prompt, keys, values, stop

    def cancel(self, request_id: Hashable) -> bool:
        """Drop a queued or running request (its cache row is freed now). Returns False for an unknown id."""
        for req in self._pending:
            if req.request_id == request_id:
                self._pending.remove(req)
                return True
        for i, req in enumerate(self._rows):
            if req.request_id == request_id:
                self._keep([j for j in range(len(self._rows)) if j != i])
                return True
        return False

    @property
    def num_active(self) -> int:
        """Rows in the running batch."""
        return len(self._rows)

    @property
    def active_ids(self) -> list[Hashable]:
        """Ids of the running rows, in batch order."""
        return [r.request_id for r in self._rows]

    @property
    def num_pending(self) -> int:
        """Requests waiting for a free row."""
        return len(self._pending)

    @property
    def has_work(self) -> bool:
        """Whether any request is queued or running."""
        return bool(self._rows or self._pending)

    def cached_kv(self, request_id: Hashable) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cached keys/values of a running row, per layer ``([kv_heads, n, head_dim], same)`` with
        ``n = P + prompt + generated tokens fed back``; its first ``P`` columns are the prefix (for inspection)."""
        for i, req in enumerate(self._rows):
            if req.request_id == request_id:
                return [(k[i, :, k.shape[2] - req.length:], v[i, :, v.shape[2] - req.length:])
                        for k, v in self._layers()]
        raise KeyError(f"request {request_id!r} is not running")

    # --- stepping ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Give every active row one token: one decode forward for the running rows, then one prefill forward for
        the rows admitted now (up to the free rows). Finished rows leave the batch before this returns.
        Returns the new token of each row (running rows first, in batch order, then the admitted ones)."""
        outputs: list[StepOutput] = []
        if self._rows:
            outputs += self._decode()
        free = self.config.max_batch - len(self._rows)
        admit = min(free, len(self._pending), self.config.max_prefill_rows or free)
        if admit > 0:
            outputs += self._prefill([self._pending.popleft() for _ in range(admit)])
        return outputs

    def run(self) -> dict[Hashable, list[int]]:
        """Step until every queued and running request has finished; returns the tokens of each."""
        tokens: dict[Hashable, list[int]] = {}
        while self.has_work:
            for out in self.step():
                tokens.setdefault(out.request_id, []).append(out.token_id)
        return tokens

    def _decode(self) -> list[StepOutput]:
        rows = self._rows
        width = self._cache.get_seq_length()
        lengths = torch.tensor([r.length for r in rows], device=self.device)
        cols = torch.arange(width + 1, device=self.device)
        mask = (cols[None, :] >= (width - lengths)[:, None]).long()  # [B, L + 1]: each row's block + the new token
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=lengths[:, None], cache=self._cache,
                        use_cache=True)
        for r in rows:
            r.length += 1
        outputs = self._emit(rows, out.logits[:, -1])
        self._keep([i for i, o in enumerate(outputs) if not o.finished])
        return outputs

    def _prefill(self, rows: list[_Request]) -> list[StepOutput]:
        """Prefill newly admitted rows together: cache ``[0.., prefix_r]`` (left-padded to the longest new prefix),
        input ``[prompt_r, pad..]`` (right-padded), positions ``P_r + j``; then sample each row's first token
        from its last prompt position and merge the rows that continue into the batch cache."""
        b = len(rows)
        p = [r.prefix_len for r in rows]
        t = [len(r.prompt) for r in rows]
        p_max, t_max = max(p), max(t)
        ids = torch.zeros(b, t_max, dtype=torch.long)  # padding: token 0 (any valid id; masked, never kept)
        mask = torch.zeros(b, p_max + t_max, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : t[i]] = torch.tensor(r.prompt)
            mask[i, p_max - p[i] : p_max + t[i]] = 1
        # Positions P_r + j; padding after a prompt repeats its last position (GPT-2 indexes a position table).
        last = torch.tensor(t)[:, None] - 1  # [b, 1] index of each row's last prompt token
        positions = torch.tensor(p)[:, None] + torch.minimum(torch.arange(t_max)[None, :], last)
        cache = DynamicCache()
        if p_max:
            data = []
            for layer, site in enumerate(self.geometry.sites):
                shape = (b, site.kv_heads, p_max, site.head_dim)
                k = torch.zeros(shape, dtype=self.dtype, device=self.device)
                v = torch.zeros(shape, dtype=self.dtype, device=self.device)
                for i, r in enumerate(rows):
                    if r.keys is not None:
                        k[i, :, p_max - p[i] :] = r.keys[layer]
                        v[i, :, p_max - p[i] :] = r.values[layer]
                data.append((k, v))
            cache = DynamicCache(ddp_cache_data=data)
        last = last.to(self.device)
        kwargs = {"logits_to_keep": last} if self._logits_to_keep else {}
        out = self.base(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                        position_ids=positions.to(self.device), cache=cache, use_cache=True, **kwargs)
        logits = out.logits
        if logits.shape[1] != 1:  # the model computed every position: pick each row's last prompt token
            logits = logits.gather(1, last[..., None].expand(-1, -1, logits.shape[-1]))
        for i, r in enumerate(rows):
            r.length = p[i] + t[i]
        outputs = self._emit(rows, logits[:, 0])
        joining = [i for i, o in enumerate(outputs) if not o.finished]
        if joining:
            cols = [slice(p_max - p[i], p_max + t[i]) for i in joining]  # each row's prefix + prompt columns
            per_layer = [[(k[i, :, c], v[i, :, c]) for i, c in zip(joining, cols, strict=True)] for k, v, *_ in cache]
            self._join([rows[i] for i in joining], per_layer)
        return outputs

    # --- the batch cache --------------------------------------------------------------------------------------
    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k, v) for k, v, *_ in self._cache] if self._cache is not None else []

    def _join(self, rows: list[_Request], per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Append rows whose valid K/V (``[kv_heads, length_r, head_dim]`` per layer) were just computed,
        left-padding the batch or the new rows so every row's block stays right-aligned."""
        old = self._layers()
        width_old = old[0][0].shape[2] if old else 0
        width = max(width_old, *(r.length for r in rows))
        data = []
        for layer, new in enumerate(per_layer):
            keys = [F.pad(old[layer][0], (0, 0, width - width_old, 0))] if old else []
            values = [F.pad(old[layer][1], (0, 0, width - width_old, 0))] if old else []
            for k, v in new:
                keys.append(F.pad(k, (0, 0, width - k.shape[1], 0))[None])
                values.append(F.pad(v, (0, 0, width - v.shape[1], 0))[None])
            data.append((torch.cat(keys), torch.cat(values)))
        self._cache = DynamicCache(ddp_cache_data=data)
        self._rows = self._rows + rows

    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep`` (batch indices); drop the others' cache rows and trim the leading
        columns no remaining row uses."""
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = None
            return
        index = torch.tensor(keep, device=self.device)
        width = max(r.length for r in self._rows)
        data = [(k.index_select(0, index)[:, :, -width:], v.index_select(0, index)[:, :, -width:])
                for k, v in self._layers()]
        self._cache = DynamicCache(ddp_cache_data=data)

    # --- tokens -----------------------------------------------------------------------------------------------
    def _emit(self, rows: list[_Request], logits: torch.Tensor) -> list[StepOutput]:
        """Choose each row's token from ``logits [B, V]`` and check whether it ends the request."""
        logits = logits.float()
        greedy = logits.argmax(-1).tolist()
        outputs = []
        for i, r in enumerate(rows):
            token = greedy[i] if r.temperature == 0 else self._sample(r, logits[i])
            r.generated.append(token)
            reason = self._finish_reason(r, token)
            outputs.append(StepOutput(r.request_id, token, len(r.generated) - 1, reason is not None, reason))
        return outputs

    @staticmethod
    def _sample(r: _Request, logits: torch.Tensor) -> int:
        probs = torch.softmax(logits.float() / r.temperature, dim=-1)
        if not torch.isfinite(probs).all():  # a temperature so small that it divides to infinity: greedy
            return int(logits.argmax().item())
        probs, order = probs.sort(descending=True)
        if r.top_p < 1:  # the smallest set reaching top_p, never empty (a top_p that rounds to 0 keeps the top-1)
            keep = (probs.cumsum(-1) - probs) < r.top_p
            keep[..., 0] = True
            probs = probs * keep
        return int(order[torch.multinomial(probs, 1, generator=r.generator)].item())

    def _finish_reason(self, r: _Request, token: int) -> str | None:
        if token in self.eos_token_ids and not r.ignore_eos:
            return "eos"
        if token in r.stop_token_ids:
            return "stop"
        if r.stop:
            text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
            start = max(0, r.checked_chars - max(len(s) for s in r.stop) + 1)
            r.checked_chars = len(text)
            if any(s in text[start:] for s in r.stop):
                return "stop"
        if len(r.generated) >= r.max_new_tokens:
            return "length"
        return None

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

    def _fold_prefix(self, prefix) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Any accepted prefix form -> per-layer keys/values ``[kv_heads, P, head_dim]`` in the base dtype/device."""
        if prefix is None:
            return None, None
        if isinstance(prefix, PrefixModel):
            prefix = prefix.prefix_kv()
        if isinstance(prefix, PrefixArtifact):
            prefix.check_base(self.base)
            keys, values = prefix.keys_values()
        elif isinstance(prefix, PrefixKV):
            if prefix.valid.shape[0] != 1:
                raise ValueError(f"a PrefixKV prefix must hold one prefix, this one holds {prefix.valid.shape[0]}")
            p = int(prefix.valid[0].sum())
            if not bool(prefix.valid[0, :p].all()):
                raise ValueError("a PrefixKV prefix must have its padding at the end")
            keys = [k[0, :, :p] for k in prefix.keys]
            values = [v[0, :, :p] for v in prefix.values]
        elif isinstance(prefix, torch.Tensor):
            if prefix.dim() != 2 or prefix.shape[1] != self.geometry.width:
                raise ValueError(f"a prefix table must be [P, {self.geometry.width}] for "
                                 f"{self.geometry.describe()}, got {tuple(prefix.shape)}")
            kv = table_to_kv(prefix, self.geometry)
            keys, values = [k[0] for k in kv.keys], [v[0] for v in kv.values]
        elif isinstance(prefix, (tuple, list)) and len(prefix) == 2:
            keys, values = list(prefix[0]), list(prefix[1])
        else:
            raise TypeError(f"unsupported prefix {type(prefix).__name__}: give a PrefixArtifact, a PrefixKV, "
                            "(keys, values), a [P, W] table or a PrefixModel")
        sites = self.geometry.sites
        if len(keys) != len(sites) or len(values) != len(sites):
            raise ValueError(f"the prefix has {len(keys)} sites, {self.geometry.describe()} has {len(sites)}")
        p = keys[0].shape[-2]
        for site, k, v in zip(sites, keys, values, strict=True):
            want = (site.kv_heads, p, site.head_dim)
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise ValueError(f"prefix site {site.name}: keys {tuple(k.shape)} / values {tuple(v.shape)}, "
                                 f"expected {want}")
        if p == 0:
            return None, None
        cast = {"dtype": self.dtype, "device": self.device}
        return [k.detach().to(**cast) for k in keys], [v.detach().to(**cast) for v in values]
