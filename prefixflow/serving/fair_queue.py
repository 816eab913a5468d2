"""Fair shares between clients: the rows that wait for a batch row, one queue per client, taken in the order of
the Virtual Token Counter (VTC; Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024).

Each client has a counter of the service it got: a row's prompt tokens count ``PROMPT_WEIGHT`` each when the row
is admitted to the batch, and each generated token ``OUTPUT_WEIGHT``. When a batch row is free, the next row comes
from the client with the lowest counter among those that have rows waiting (on a tie, the one with fewer rows
running; first come, first served within a client). A client that had nothing waiting has its counter lifted, on
arrival, to the lowest counter of the clients that are waiting (or, when none waits, of those running): being idle
earns no credit; and a client with nothing waiting or running is forgotten, so past service is no debt either. So
a client that sends ten times more requests than another gets its share of the tokens and no more, and the other's
requests do not wait behind the flood.

Preemption (:meth:`FairQueue.victim`): when every batch row is taken and a client with rows waiting runs fewer rows
than its share of the batch (the batch divided by the clients running or waiting) while another runs more, the
engine loop preempts the running row with the fewest tokens (the cheapest to recompute) of the client running most
(the engine drops its cache; the row waits at the front of its client's queue and, taken again, is prefilled anew
and goes on). Without it a newcomer waits for a row to end, and rows admitted together end together: a whole
request's time behind a flood.

Per-client limits (``None``: none): ``max_running`` rows of one client in the batch at once (its other rows wait
even if rows are free, leaving room for others), ``max_queued`` rows of one client waiting (beyond it the server
answers 429, see :mod:`prefixflow.serving.engine_loop`). Not thread-safe: the engine loop holds its lock around
every call.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

PROMPT_WEIGHT = 1.0  # service counted per prompt token at admission
OUTPUT_WEIGHT = 2.0  # per generated token (decoding one costs a step; VTC's usual weights)


class _Queued(Protocol):
    id: str
    client: str
    prompt_ids: list[int]


class FairQueue:
    """Waiting rows per client, taken lowest-counter first (see the module docstring)."""

    def __init__(self, max_running: int | None = None, max_queued: int | None = None) -> None:
        self.max_running, self.max_queued = max_running, max_queued
        self._queues: dict[str, deque] = {}
        self._counters: dict[str, float] = {}
        self._running: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def queued_of(self, client: str) -> int:
        return len(self._queues.get(client, ()))

    def running_of(self, client: str) -> int:
        return self._running.get(client, 0)

    def counter(self, client: str) -> float:
        return self._counters.get(client, 0.0)

    def push(self, row: _Queued, front: bool = False) -> None:
        """A row arrives (its checks passed); it waits behind the rows of its own client only (``front``: ahead of
        them: a preempted row)."""
        queue = self._queues.get(row.client)
        if not queue:
            floor = self._floor(exclude=row.client)
            self._counters[row.client] = max(self.counter(row.client), floor)
            queue = self._queues.setdefault(row.client, deque())
        if front:
            queue.appendleft(row)
        else:
            queue.append(row)

    def victim(self, batch: int) -> tuple[str, str] | None:
        """``(over, short)`` when the ``batch`` rows are all taken: ``over`` runs more than its share and one of its
        rows is to be preempted for ``short``, which has rows waiting and runs fewer (and is below its running
        limit); the client running most for the one running least. None when no client is short of its share."""
        demanding = set(self._running) | set(self._queues)
        share = max(1, batch // max(1, len(demanding)))
        short = [c for c in self._queues if self.running_of(c) < share
                 and (self.max_running is None or self.running_of(c) < self.max_running)]
        over = [c for c in self._running if self.running_of(c) > share]
        if not short or not over:
            return None
        return max(over, key=self.running_of), min(short, key=self.running_of)

    def take(self, client: str | None = None) -> _Queued | None:
        """The next row to admit (its client's counter charged for its prompt), or None when no client with rows
        waiting is below its running limit. ``client``: that client's next row (the one a preemption was for)."""
        ready = [c for c, q in self._queues.items() if q and (self.max_running is None
                                                              or self.running_of(c) < self.max_running)]
        if client is None and ready:
            client = min(ready, key=lambda c: (self.counter(c), self.running_of(c)))  # a tie: the one running less
        if client not in ready:
            return None
        row = self._queues[client].popleft()
        if not self._queues[client]:
            del self._queues[client]
        self._counters[client] = self.counter(client) + PROMPT_WEIGHT * len(row.prompt_ids)
        self._running[client] = self.running_of(client) + 1
        return row

    def served(self, client: str, tokens: int = 1) -> None:
        """``tokens`` new tokens generated for a running row of ``client``."""
        self._counters[client] = self.counter(client) + OUTPUT_WEIGHT * tokens

    def ended(self, client: str) -> None:
        """A running row of ``client`` left the batch (finished, cancelled or failed)."""
        left = self.running_of(client) - 1
        if left > 0:
            self._running[client] = left
        else:
            self._running.pop(client, None)
            if client not in self._queues:  # idle: it comes back at the others' level (no credit, no debt)
                self._counters.pop(client, None)

    def remove(self, row_id: str) -> bool:
        """Drop a waiting row (its request went away); False when no such row waits."""
        for client, queue in self._queues.items():
            for row in queue:
                if row.id == row_id:
                    queue.remove(row)
                    if not queue:
                        del self._queues[client]
                    return True
        return False

    def drain(self) -> list[_Queued]:
        """Every waiting row, the queues emptied (the server is stopping)."""
        rows = [row for queue in self._queues.values() for row in queue]
        self._queues.clear()
        return rows

    def _floor(self, exclude: str) -> float:
        waiting = [self.counter(c) for c, q in self._queues.items() if q and c != exclude]
        running = [self.counter(c) for c, n in self._running.items() if n and c != exclude]
        return min(waiting or running or [0.0])
