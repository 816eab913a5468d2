"""Attention over a row's prefix (read from the shared ``PrefixPool``) and its own cached tokens (``SlotCache``
views), without concatenating the two: scores for both segments, one softmax over them, one weighted sum each.

Grouped-query heads are handled by folding each KV head's query heads into the query length (``[B, kv_heads,
groups * q, head_dim]``), so no key or value is repeated or copied. The prefix segment reads each row's pool entry
(a gather of ``P x head_dim`` per row and KV head: the prefix only, never the cache).

Called through ``prefix_core.attention`` when a forward carries ``slot_batch`` (the decode engine's forwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_slots import PrefixPool


@dataclass
class SlotBatch:
    """The prefixes of one forward's rows. ``entries``: ``[B]`` pool entry per batch row, or None when no row has a
    prefix (the prefix segment is skipped). ``valid``: ``[B, 1, 1, 1, P_max]`` prefix columns each row attends."""

    pool: PrefixPool
    entries: torch.Tensor | None
    valid: torch.Tensor | None

    @classmethod
    def of(cls, pool: PrefixPool, entries: list[int], device: torch.device) -> SlotBatch:
        if not any(entries) or pool.width == 0:
            return cls(pool, None, None)
        index = torch.tensor(entries, device=device)
        return cls(pool, index, pool.valid.index_select(0, index)[:, None, None, None, :])


def slot_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                   batch: SlotBatch, site: int, scaling: float | None = None) -> tuple[torch.Tensor, None]:
    """``query [B, H, q, d]``; ``key``/``value [B, kv_heads, L, d]`` (the rows' own columns: views of their slots or
    this forward's new tokens); ``mask [B, 1, q, L]`` bool, True where a query may attend a column (at least one
    column per query). Returns ``([B, q, H, d], None)`` like transformers' attention functions."""
    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else d**-0.5
    folded = query.reshape(b, kv_heads, groups * q, d) * scale
    scores = (folded @ key.transpose(-1, -2)).view(b, kv_heads, groups, q, -1)
    scores = scores.float().masked_fill(~mask[:, :, None], float("-inf"))
    width = 0
    if batch.entries is not None:
        keys_p = batch.pool.keys[site].index_select(0, batch.entries).to(query.dtype)
        prefix = (folded @ keys_p.transpose(-1, -2)).view(b, kv_heads, groups, q, -1)
        prefix = prefix.float().masked_fill(~batch.valid, float("-inf"))
        width = prefix.shape[-1]
        scores = torch.cat([prefix, scores], dim=-1)
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b, kv_heads, groups * q, -1)
    out = probs[..., width:] @ value
    if width:
        values_p = batch.pool.values[site].index_select(0, batch.entries).to(value.dtype)
        out = out + probs[..., :width] @ values_p
    return out.view(b, heads, q, d).transpose(1, 2).contiguous(), None
