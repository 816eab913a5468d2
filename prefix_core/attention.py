"""Prefix attention: prepends each site's prefix keys/values inside attention.

We register attention functions (``prefixflow_sdpa``, ``prefixflow_eager``) in transformers'
``AttentionInterface`` and matching *always-materialized* mask functions in
``AttentionMaskInterface``. The prefix travels as forward kwargs (``prefix_kv``,
``prefix_rows``), which transformers passes down to every attention call. Nothing touches the KV
cache, so generation, gradient checkpointing (the kwargs are re-passed on recompute), encoder
self-attention and cross-attention all work the same way. With no ``prefix_kv`` kwarg the
functions are exactly the wrapped sdpa/eager attention, so the base model stays usable bare.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward
from transformers.utils.generic import TransformersKwargs

from .slot_attention import slot_attention

SITE_ATTR = "_prefixflow_site"
PREFIX_KWARGS = ("prefix_kv", "prefix_rows", "prefix_capture", "slot_batch")
PREFIX_IMPL = {"sdpa": "prefixflow_sdpa", "eager": "prefixflow_eager"}


@dataclass
class PrefixKV:
    """Keys/values of a bank of N prefixes for every site of one model.

    ``keys[i]`` and ``values[i]``: ``[N, kv_heads_i, P_max, head_dim_i]`` for site i.
    ``valid``: ``[N, P_max]`` bool, False where a shorter prefix is padded (padding at the end).
    Rows of a batch pick their prefix with a ``prefix_rows`` LongTensor ``[B]``; with no rows,
    N must be 1 and the one prefix is broadcast over the batch.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor
    _mask_cache: dict = field(default_factory=dict, repr=False)

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(-1)

    def select(self, site: int, rows: torch.Tensor | None, batch: int, dtype: torch.dtype):
        k, v = self.keys[site].to(dtype), self.values[site].to(dtype)  # no-op when already in dtype
        if rows is None:
            return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        return k.index_select(0, rows), v.index_select(0, rows)

    def extend_mask(self, mask, rows, causal: bool, q_len: int, kv_len: int, batch: int,
                    additive: torch.dtype | None) -> torch.Tensor:
        """Prepend the prefix columns to a 4D mask: bool, or additive float in dtype ``additive``
        (eager). Computed once per mask object and reused by every layer that sees that mask."""
        key = (id(mask), id(rows), q_len, kv_len)
        hit = self._mask_cache.get(key)
        if hit is not None and hit[0] is mask and hit[1] is rows:
            return hit[2]
        source = mask
        valid = self.valid.expand(batch, -1) if rows is None else self.valid.index_select(0, rows)
        cols = valid[:, None, None, :].expand(batch, 1, q_len, valid.shape[-1])
        if mask is None:
            real = torch.ones(q_len, kv_len, dtype=torch.bool, device=valid.device)
            if causal and q_len > 1:
                real = real.tril(kv_len - q_len)
            mask = real[None, None].expand(batch, 1, q_len, kv_len)
            if additive is not None:
                mask = _to_additive(mask, additive)
        cols = cols if mask.dtype == torch.bool else _to_additive(cols, mask.dtype)
        cols = cols.to(mask.device)
        mask = mask.expand(batch, -1, q_len, -1)
        out = torch.cat([cols, mask], dim=-1)
        if len(self._mask_cache) > 8:
            self._mask_cache.clear()
        self._mask_cache[key] = (source, rows, out)
        return out


def _to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def _model_eager(module):
    """The eager attention of the module's own modeling file (GPT-2's differs from Llama's)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", eager_attention_forward)


def _make_attention(name: str):
    eager = name == "prefixflow_eager"

    def prefix_attention(module, query, key, value, attention_mask, *, prefix_kv=None, prefix_rows=None,
                         prefix_capture=None, slot_batch=None, **kwargs):
        site = getattr(module, SITE_ATTR, None)
        if slot_batch is not None and site is not None:  # the decode engine's forwards: see slot_attention
            return slot_attention(module, query, key, value, attention_mask, slot_batch, site, kwargs.get("scaling"))
        if prefix_capture is not None and site is not None:
            prefix_capture[site] = (key.detach(), value.detach())
        if prefix_kv is not None and site is not None:
            batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
            k_p, v_p = prefix_kv.select(site, prefix_rows, batch, key.dtype)
            attention_mask = prefix_kv.extend_mask(
                attention_mask, prefix_rows, getattr(module, "is_causal", True), q_len, kv_len, batch,
                query.dtype if eager else None,
            )
            key = torch.cat([k_p.to(key.device), key], dim=2)
            value = torch.cat([v_p.to(value.device), value], dim=2)
        inner = _model_eager(module) if eager else sdpa_attention_forward
        return inner(module, query, key, value, attention_mask, **kwargs)

    prefix_attention.__name__ = f"{name}_forward"
    return prefix_attention


def _materialized(mask_fn):
    """A mask function that never returns None (sdpa's ``is_causal`` shortcut cannot be combined
    with prefix columns)."""

    def mask(*args, **kwargs):
        kwargs["allow_is_causal_skip"] = False
        kwargs["allow_is_bidirectional_skip"] = False
        return mask_fn(*args, **kwargs)

    return mask


def register() -> None:
    """Register the prefix attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register("prefixflow_sdpa", _make_attention("prefixflow_sdpa"))
    AttentionInterface.register("prefixflow_eager", _make_attention("prefixflow_eager"))
    AttentionMaskInterface.register("prefixflow_sdpa", _materialized(sdpa_mask))
    AttentionMaskInterface.register("prefixflow_eager", _materialized(eager_mask))
    # Declare our forward kwargs as known transformers kwargs, so generate() forwards them to the
    # model instead of rejecting them as typos.
    TransformersKwargs.__optional_keys__ = TransformersKwargs.__optional_keys__ | set(PREFIX_KWARGS)


register()
