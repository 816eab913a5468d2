"""EngineLoop: one thread owns the decode engine; request handlers (asyncio) submit rows and receive tokens.

A row is one generated sequence (a request with ``n`` choices or several prompts submits several rows). Between
steps the thread checks submitted rows, queues them per client (:class:`~prefixflow.serving.fair_queue.FairQueue`:
when a batch row is free, the next row comes from the client that got the least service so far, so one client's
flood does not hold up the others; a client short of its share gets a row preempted from one over it), hands the
engine as many as it has free rows, applies cancellations (a client
that went away frees its row at once), runs ``engine.step()`` while there is work and sends each row's events to
its asyncio queue:

- ``("accepted", None)``: the engine took the row (its length and parameters are valid);
- ``("error", message)``: it refused it (the message says why; HTTP 400), or the step failed (HTTP 500);
- ``("token", StepOutput)``: one new token; the last one has ``finished`` set.

Admission is bounded: ``submit`` raises ``Overloaded`` (HTTP 429) when more than ``max_queued`` rows would wait
for a batch row, or more than ``client_max_queued`` rows of one client, so every admitted row is answered and the
server never grows without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import threading
import time
from dataclasses import dataclass, field

from prefix_core.sampling import SamplingParams
from prefixflow.serving.bank import Prefix
from prefixflow.serving.fair_queue import FairQueue
from prefixflow.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """Too many rows waiting; ``retry_after`` (whole seconds) estimates when there will be room."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Row:
    """One sequence to generate. ``prefix``: the bank entry it started with (kept until it ends); ``client``: whose
    share of the server it uses (the caller's client)."""

    id: str
    prompt_ids: list[int]
    prefix: Prefix | None
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    client: str = "-"
    generated: int = 0  # tokens sent so far


class EngineLoop:
    """Drives ``engine`` (a ``prefix_core.DecodeEngine`` or anything with its ``add/cancel/step`` interface)."""

    def __init__(self, engine, metrics: ServerMetrics, max_queued: int, client_max_running: int | None = None,
                 client_max_queued: int | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queued = max_queued
        self.batch = max(1, getattr(getattr(engine, "config", None), "max_batch", 1))
        self._cond = threading.Condition()
        self._inbox: list[Row] = []  # submitted, not yet checked
        self._fair = FairQueue(client_max_running, client_max_queued)  # checked, waiting for a batch row
        self._cancels: set[str] = set()
        self._rows: dict[str, Row] = {}  # rows the engine holds (handed to it or running)
        self._stopping = False
        self._mean_latency = 1.0  # seconds per finished row, smoothed: for Retry-After
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)
        self._streams = "emit" in inspect.signature(engine.step).parameters

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Rows admitted but not yet in the running batch."""
        return len(self._inbox) + len(self._fair) + self.engine.num_pending

    def submit(self, rows: list[Row]) -> None:
        """Hand rows (of one client) to the engine thread, all or none. Raises Overloaded when the queue, or the
        client's part of it, is full."""
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is shutting down; retry on another replica", 5)
            waiting = self.waiting
            retry = max(1, min(60, math.ceil(self._mean_latency * (waiting + len(rows)) / self.batch)))
            if waiting + len(rows) > self.max_queued:
                raise Overloaded(f"the server is at capacity ({waiting} requests waiting, at most "
                                 f"{self.max_queued}); retry after {retry} s", retry)
            limit, client = self._fair.max_queued, rows[0].client if rows else "-"
            if limit is not None:
                mine = self._fair.queued_of(client) + sum(r.client == client for r in self._inbox)
                if mine + len(rows) > limit:
                    raise Overloaded(f"client {client!r} has {mine} requests waiting, at most {limit} per client "
                                     f"on this server; retry after {retry} s", retry)
            self._inbox.extend(rows)
            self._cond.notify()

    def cancel(self, row_ids: list[str]) -> None:
        """Drop rows (queued or running); their batch rows are freed before the next step."""
        with self._cond:
            self._cancels.update(row_ids)
            self._cond.notify()

    # --- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._inbox or self._cancels or engine.has_work or len(self._fair) or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
            checked = [row for row in inbox if row.id not in cancels and self._checked(row)]
            with self._cond:
                for row in checked:
                    self._fair.push(row)
                waiting = {row_id for row_id in cancels if self._fair.remove(row_id)}
            cancels -= waiting
            for row_id in waiting:  # a preempted row that waited: the engine still keeps its state
                engine.cancel(row_id)
            for row in checked:
                self._send(row, "accepted", None)
            for row_id in cancels:
                if engine.cancel(row_id):
                    self._ended(self._rows.pop(row_id))  # the engine held it, so the loop did
            free, admitted = self.batch - engine.num_active - engine.num_pending, []
            short = self._preempt() if free <= 0 and len(self._fair) and hasattr(engine, "preempt") else None
            with self._cond:  # the row a preemption was for, then the fairest, as many as the batch has room for
                if short is not None and (row := self._fair.take(short)) is not None:
                    admitted.append(row)
                while len(admitted) < free and (row := self._fair.take()) is not None:
                    admitted.append(row)
            for row in admitted:
                try:
                    engine.add(row.id, row.prompt_ids, row.prefix.kv if row.prefix else None, row.params)
                except ValueError as err:  # checked on arrival; kept for an engine that checks more
                    self._send(row, "error", str(err))
                    self._ended(row)
                    continue
                self._rows[row.id] = row
            if engine.has_work:
                self._step()
            self.metrics.running.set(engine.num_active)
            self.metrics.queued.set(self.waiting)
        for row in [*self._inbox, *self._fair.drain(), *self._rows.values()]:
            self._send(row, "error", "the server is shutting down")

    def _checked(self, row: Row) -> bool:
        """Whether the engine can take ``row`` (its length and parameters); if not, the row gets the reason. An
        engine without ``validate`` checks at ``add``."""
        if not hasattr(self.engine, "validate"):
            return True
        try:
            self.engine.validate(row.id, row.prompt_ids, row.prefix.kv if row.prefix else None, row.params)
        except ValueError as err:
            self._send(row, "error", str(err))
            return False
        return True

    def _preempt(self) -> str | None:
        """Preempt one running row for a client short of its share (``FairQueue.victim``); returns that client
        (its next row takes the freed row), or None when nothing was preempted."""
        with self._cond:
            pair = self._fair.victim(self.batch)
        if pair is None:
            return None
        over, short = pair
        rows = [r for r in self._rows.values() if r.client == over]
        row = min(rows, key=lambda r: r.generated) if rows else None  # the cheapest to recompute
        if row is None or not self.engine.preempt(row.id):
            return None
        del self._rows[row.id]
        with self._cond:
            self._fair.ended(over)
            self._fair.push(row, front=True)
        self.metrics.preemptions.inc()
        return short

    def _ended(self, row: Row) -> None:
        with self._cond:
            self._fair.ended(row.client)

    def _step(self) -> None:
        engine = self.engine
        if engine.num_active:
            self.metrics.batch_size.observe(engine.num_active)
        started = time.monotonic()
        try:
            if self._streams:  # each forward's tokens go out as soon as they are chosen
                engine.step(emit=lambda outputs: self._deliver(outputs, started))
            else:
                self._deliver(engine.step(), started)
        except Exception as err:  # a failed step fails its rows, never the server
            log.exception("decode step failed; failing its %d rows", len(self._rows))
            for row_id, row in list(self._rows.items()):
                engine.cancel(row_id)
                self._send(row, "error", f"generation failed: {type(err).__name__}: {err}")
                self._ended(row)
            self._rows.clear()

    def _deliver(self, outputs: list, started: float) -> None:
        """Send new tokens to their rows' queues; finished rows leave the loop's books."""
        now, served = time.monotonic(), []
        for out in outputs:
            row = self._rows.get(out.request_id)
            if row is None:
                continue
            if out.index == 0:
                wait = max(0.0, started - row.submitted)
                self.metrics.queue_wait.observe(wait)
                self.metrics.client_queue_wait.labels(row.client).observe(wait)
            self._send(row, "token", out)
            row.generated += 1
            served.append(row)
            if out.finished:
                del self._rows[out.request_id]
                self._mean_latency = 0.9 * self._mean_latency + 0.1 * (now - row.submitted)
        with self._cond:  # each client's service, for the fair order of the rows waiting
            for row in served:
                self._fair.served(row.client)
                if row.id not in self._rows:
                    self._fair.ended(row.client)

    @staticmethod
    def _send(row: Row, kind: str, payload) -> None:
        with contextlib.suppress(RuntimeError):  # its event loop is closed: the server is going down
            row.loop.call_soon_threadsafe(row.events.put_nowait, (kind, payload))
