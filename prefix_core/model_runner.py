"""The engine's runner: the forwards of one step over the frozen base, reading and writing the slot cache.

Three kinds of forward, each returning the logits of the positions that give a token:

- ``decode``: one token per decoding row, the batch being slots ``0 .. highest decoding slot`` (a free or
  prefilling slot in between runs a masked dummy token whose output is dropped and which writes nothing). Each row
  writes its new token's column at ``cached`` and attends its columns ``0 .. cached``.
- ``start``: rows starting their context (``Sequence.context``: the prompt, after a preemption also the tokens
  generated before it), left-padded to the longest chunk (so every row's last token is the last position and only
  it goes through the LM head); they attend their prefix and their own chunk, and the chunk's tokens are written
  to columns ``0 .. n - 1`` of their slots.
- ``resume``: one row part-way through its context; it attends its slot's columns ``0 .. cached + n - 1``.

Positions: a row's real token ``j`` is at position ``P + j`` (after its prefix), as in ``PrefixModel``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .kv_slots import PrefixPool, SlotCache, WritePlan
from .scheduler import Sequence
from .slot_attention import SlotBatch


class ModelRunner:
    """Runs ``base`` (attached to prefix attention) over ``cache`` and ``pool``; see the module docstring."""

    def __init__(self, base: nn.Module, cache: SlotCache, pool: PrefixPool) -> None:
        self.base, self.cache, self.pool = base, cache, pool
        self.device = cache.device
        self._keep_last = "logits_to_keep" in inspect.signature(base.forward).parameters

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits ``[len(seqs), V]`` (float32) of each row's next token, in the order of ``seqs``."""
        batch = max(s.slot for s in seqs) + 1
        ids = torch.zeros(batch, 1, dtype=torch.long)
        positions = torch.zeros(batch, 1, dtype=torch.long)
        limit = torch.zeros(batch, dtype=torch.long)  # the last column each batch row attends
        entries = [0] * batch
        for s in seqs:
            ids[s.slot, 0], positions[s.slot, 0], limit[s.slot] = s.generated[-1], s.prefix_len + s.cached, s.cached
            entries[s.slot] = s.entry
        width = int(limit.max()) + 1
        mask = torch.arange(width)[None, :] <= limit[:, None]
        slots = torch.tensor([s.slot for s in seqs])
        plan = WritePlan(slots, torch.zeros_like(slots), slots, limit[slots], (slice(0, batch), width))
        logits = self._forward(ids, positions, mask[:, None, None, :], plan, entries)[slots]
        for s in seqs:
            s.cached += 1
        return logits

    def start(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Prefill the first ``n`` context tokens of each row; logits ``[len(chunks), V]`` at each row's last one."""
        q = max(n for _, n in chunks)
        ids = torch.zeros(len(chunks), q, dtype=torch.long)
        positions = torch.zeros(len(chunks), q, dtype=torch.long)
        real = torch.zeros(len(chunks), q, dtype=torch.bool)
        rows, cols, slots = [], [], []
        for i, (s, n) in enumerate(chunks):
            pad = q - n
            ids[i, pad:] = torch.tensor(s.context[:n])
            positions[i] = s.prefix_len + (torch.arange(q) - pad).clamp(min=0)
            real[i, pad:] = True
            rows += [i] * n
            cols += list(range(n))
            slots += [s.slot] * n
        rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
        q_index = cols_t + (q - torch.tensor([n for _, n in chunks]))[rows_t]
        causal = torch.ones(q, q, dtype=torch.bool).tril()
        mask = causal[None] & (real[:, None, :] | torch.eye(q, dtype=torch.bool)[None])  # a pad query sees itself
        plan = WritePlan(rows_t, q_index, torch.tensor(slots), cols_t, None)
        logits = self._forward(ids, positions, mask[:, None], plan, [s.entry for s, _ in chunks])
        for s, n in chunks:
            s.cached = n
        return logits

    def resume(self, seq: Sequence, n: int) -> torch.Tensor:
        """Prefill ``n`` more context tokens of a row part-way through it; logits ``[1, V]`` at the last one."""
        start = seq.cached
        ids = torch.tensor([seq.context[start : start + n]])
        positions = seq.prefix_len + start + torch.arange(n)[None]
        mask = torch.arange(start + n)[None, :] <= (start + torch.arange(n))[:, None]
        plan = WritePlan(torch.zeros(n, dtype=torch.long), torch.arange(n), torch.full((n,), seq.slot),
                         start + torch.arange(n), (slice(seq.slot, seq.slot + 1), start + n))
        logits = self._forward(ids, positions, mask[None, None], plan, [seq.entry])
        seq.cached = start + n
        return logits

    def _forward(self, ids, positions, mask, plan: WritePlan, entries: list[int]) -> torch.Tensor:
        """One forward; logits ``[B, V]`` float32 at the last position of each batch row."""
        device = self.device
        plan.rows, plan.q, plan.slots, plan.cols = (t.to(device) for t in (plan.rows, plan.q, plan.slots, plan.cols))
        self.cache.plan = plan
        kwargs = {"logits_to_keep": 1} if self._keep_last else {}
        try:
            out = self.base(input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=positions.to(device), cache=self.cache, use_cache=True,
                            slot_batch=SlotBatch.of(self.pool, entries, device), **kwargs)
        finally:
            self.cache.plan = None
        return out.logits[:, -1].float()
