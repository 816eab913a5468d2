"""The engine's scheduler: one queue of waiting requests, a slot per running row, and what each step computes.

Admission: a waiting request takes the lowest free slot (FIFO; at most ``max_prefill_rows`` new rows per step). A
slot holds a row's whole context (prompt + ``max_new_tokens``, checked against the KV memory when the request
arrives), so a row once admitted never runs out of memory: the engine itself never preempts, requests wait for a
free slot. A request that could never fit is refused on arrival. A caller may preempt a row (the server does, for
fair shares between clients): its slot is freed at once, and when it is admitted again its prompt and the tokens
it had generated are prefilled anew (recomputation, as vLLM's default) and it goes on where it stopped.

Each step (see :meth:`Scheduler.plan`): at most ``prefill_chunk`` prompt tokens are prefilled (their rows' first
tokens go out at once), then every row that had its first token decodes one more; so a long prompt is prefilled
over several steps and the running rows keep their pace. At most one row is part-way through its prompt at a
time: it takes its chunk first (a forward of its own, reading its slot), then rows starting their prompt share one
forward in admission order; a row whose prompt does not fit in what is left of the budget takes a part only when
no other row is part-way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, StopCheck, TokenConstraint


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. ``keys``/``values``: its prefix per site ``[kv_heads, P, head_dim]`` (or
    None), stored in the pool as ``entry`` while it holds a slot; ``cached``: its real tokens in its slot (prompt
    tokens prefilled, then generated tokens fed back)."""

    request_id: Hashable
    prompt: list[int]
    keys: list[torch.Tensor] | None
    values: list[torch.Tensor] | None
    params: SamplingParams
    generator: torch.Generator | None
    stop: StopCheck
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    entry: int = 0
    cached: int = 0
    order: int = 0  # arrival order
    constraint: TokenConstraint | None = None

    @property
    def prefix_len(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[1]

    @property
    def columns(self) -> int:
        """The most columns it will hold in its slot."""
        return len(self.prompt) + self.params.max_new_tokens

    @property
    def context(self) -> list[int]:
        """The tokens its slot must hold before it can decode: the prompt, and for a row that was preempted and
        admitted again, the tokens it had generated (all but the newest, which the next decode step feeds)."""
        return self.prompt + self.generated[:-1] if self.generated else self.prompt

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.context)


@dataclass
class StepPlan:
    """What one step computes: ``decode`` rows (one token each), ``continuing`` (a row part-way through its prompt
    and its chunk length) and ``starting`` (rows starting their prompt, with their chunk lengths)."""

    decode: list[Sequence]
    continuing: tuple[Sequence, int] | None
    starting: list[tuple[Sequence, int]]


class Scheduler:
    """Waiting requests, slots and the per-step plan (see the module docstring)."""

    def __init__(self, rows: int, prefill_chunk: int, max_prefill_rows: int | None = None) -> None:
        self.rows, self.prefill_chunk, self.max_prefill_rows = rows, prefill_chunk, max_prefill_rows
        self.waiting: deque[Sequence] = deque()
        self.slots: list[Sequence | None] = [None] * rows
        self._arrivals = 0

    def queue(self, seq: Sequence) -> None:
        self._arrivals += 1
        seq.order = self._arrivals
        self.waiting.append(seq)

    @property
    def running(self) -> list[Sequence]:
        """Rows holding a slot, in slot order."""
        return [s for s in self.slots if s is not None]

    def find(self, request_id: Hashable) -> Sequence | None:
        return next((s for s in (*self.waiting, *self.running) if s.request_id == request_id), None)

    def admit(self) -> list[Sequence]:
        """Move waiting requests into free slots (lowest first); returns those admitted now."""
        admitted: list[Sequence] = []
        limit = self.max_prefill_rows or self.rows
        for slot, holder in enumerate(self.slots):
            if not self.waiting or len(admitted) >= limit:
                break
            if holder is None:
                seq = self.waiting.popleft()
                seq.slot, self.slots[slot] = slot, seq
                admitted.append(seq)
        return admitted

    def release(self, seq: Sequence) -> None:
        """A running row ended or was preempted: its slot is free for the next step."""
        self.slots[seq.slot] = None
        seq.slot = None

    def plan(self) -> StepPlan:
        running = self.running
        decode = [s for s in running if not s.prefilling]
        prefilling = sorted((s for s in running if s.prefilling), key=lambda s: s.order)
        budget, continuing, starting = self.prefill_chunk, None, []
        partway = next((s for s in prefilling if s.cached), None)
        if partway is not None:
            n = min(len(partway.context) - partway.cached, budget)
            continuing, budget = (partway, n), budget - n
        for seq in prefilling:
            if seq.cached or budget == 0:
                continue
            n = min(len(seq.context), budget)
            if n < len(seq.context) and (partway is not None or any(m < len(s.context) for s, m in starting)):
                break
            starting.append((seq, n))
            budget -= n
        return StepPlan(decode, continuing, starting)
