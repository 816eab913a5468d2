"""Fair shares between clients (``prefixflow.serving.fair_queue``), without a model: the order rows are taken in
when one client floods and another sends a request at a time, shares between two backlogged clients at 10:1,
the per-client running limit, and what an idle client comes back to."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from prefixflow.serving.fair_queue import FairQueue

_ids = itertools.count()


@dataclass
class Row:
    client: str
    prompt_ids: list[int] = field(default_factory=lambda: [1] * 8)
    id: str = field(default_factory=lambda: f"r{next(_ids)}")


def simulate(queue: FairQueue, batch: int, steps: int, arrivals, tokens_per_row: int = 8) -> dict:
    """A decode loop with ``batch`` rows: each step, ``arrivals(step, queue)`` may push rows, free rows are filled
    from the queue, every running row gets a token, rows end after ``tokens_per_row``. Returns each row's wait in
    steps (from its push to its admission) and each client's tokens."""
    pushed, waits, running, tokens = {}, {}, {}, {}
    for step in range(steps):
        for row in arrivals(step, queue, running):
            queue.push(row)
            pushed[row.id] = step
        while len(running) < batch and (row := queue.take()) is not None:
            running[row.id] = [row, 0]
            waits[row.id] = (row.client, step - pushed[row.id])
        for row_id, entry in list(running.items()):
            row = entry[0]
            queue.served(row.client)
            tokens[row.client] = tokens.get(row.client, 0) + 1
            entry[1] += 1
            if entry[1] == tokens_per_row:
                del running[row_id]
                queue.ended(row.client)
    return {"waits": waits, "tokens": tokens}


def test_one_request_at_a_time_is_not_held_up_by_a_flood():
    """acme pushes 40 rows at once; globex sends one request, and the next when it ends. globex's rows start at the
    next free batch row (first come, first served would make the first wait for all 40 of acme's)."""

    def arrivals(step, queue, running):
        rows = [Row("acme") for _ in range(40)] if step == 0 else []
        if step >= 3 and queue.queued_of("globex") == 0 and not any(e[0].client == "globex"
                                                                     for e in running.values()):
            rows.append(Row("globex"))
        return rows

    result = simulate(FairQueue(), batch=4, steps=200, arrivals=arrivals)
    globex = [wait for client, wait in result["waits"].values() if client == "globex"]
    assert len(globex) > 10
    assert max(globex) <= 8  # at most until the next row ends (8 tokens a row), never behind acme's queue
    fifo = simulate(_Fifo(), batch=4, steps=200, arrivals=arrivals)
    assert max(wait for client, wait in fifo["waits"].values() if client == "globex") >= 60  # the flood ahead


def test_two_backlogged_clients_at_ten_to_one_get_equal_shares():
    """acme sends ten times as many requests as globex, both faster than the batch serves them: each gets half
    of the tokens while both wait."""

    def arrivals(step, queue, running):
        return [Row("acme") for _ in range(10)] + [Row("globex")]

    result = simulate(FairQueue(), batch=4, steps=400, arrivals=arrivals)
    acme, globex = result["tokens"]["acme"], result["tokens"]["globex"]
    assert abs(acme - globex) <= 0.05 * (acme + globex), result["tokens"]


def test_the_running_limit_leaves_rows_for_others_and_queued_rows_wait():
    queue = FairQueue(max_running=2)
    for _ in range(5):
        queue.push(Row("acme"))
    taken = [queue.take() for _ in range(3)]
    assert [r.client for r in taken[:2]] == ["acme", "acme"] and taken[2] is None  # acme at its limit
    queue.push(Row("globex"))
    assert queue.take().client == "globex"
    queue.ended("acme")
    assert queue.take().client == "acme" and queue.running_of("acme") == 2 and queue.queued_of("acme") == 2


def test_an_idle_client_comes_back_level_with_the_others_without_credit():
    """globex is served for a while, then is idle while acme is served; when it comes back its counter is lifted
    to acme's, so it shares from then on instead of taking every row until its old counter is reached."""
    queue = FairQueue()
    for _ in range(3):
        queue.push(Row("globex"))
        queue.take()
        queue.served("globex", 10)
        queue.ended("globex")
    assert queue.counter("globex") == 0.0  # idle and forgotten: no debt for past service
    for _ in range(6):
        queue.push(Row("acme"))
    for _ in range(3):
        queue.take()
        queue.served("acme", 50)
    queue.push(Row("globex"))
    assert queue.counter("globex") == queue.counter("acme")  # lifted: no credit for the idle time either
    queue.push(Row("globex"))
    order = [queue.take().client for _ in range(4)]
    assert order.count("globex") == 2 and order[0] == "globex"  # level, and the one running less goes first


def test_cancelled_and_drained_rows_leave_the_queue():
    queue = FairQueue()
    rows = [Row("acme"), Row("acme"), Row("globex")]
    for row in rows:
        queue.push(row)
    assert queue.remove(rows[1].id) and not queue.remove("nobody") and len(queue) == 2
    assert {r.id for r in queue.drain()} == {rows[0].id, rows[2].id} and len(queue) == 0


def test_a_client_short_of_its_share_names_the_one_to_preempt():
    """acme holds all 4 rows; globex arrives: acme is over its share (4 // 2 = 2) and globex under it, so acme is
    the victim until globex has its share; nobody is preempted for a client at its share or its limit."""
    queue = FairQueue()
    for _ in range(6):
        queue.push(Row("acme"))
    for _ in range(4):
        queue.take()
    assert queue.victim(4) is None  # only acme wants rows
    queue.push(Row("globex"))
    queue.push(Row("globex"))
    queue.push(Row("globex"))
    for _ in range(2):  # the engine loop preempts one acme row at a time and admits globex's next
        assert queue.victim(4) == ("acme", "globex")
        queue.ended("acme")
        queue.push(Row("acme"), front=True)
        assert queue.take("globex").client == "globex"
    assert queue.running_of("globex") == 2 and queue.victim(4) is None  # globex has its share: no more
    limited = FairQueue(max_running=1)
    limited.push(Row("acme"))
    limited.take()
    limited.push(Row("globex"))
    limited.take()
    limited.push(Row("globex"))
    assert limited.victim(2) is None  # globex is at its running limit


class _Fifo(FairQueue):
    """First come, first served (the order before fair shares), for comparison."""

    def __init__(self) -> None:
        super().__init__()
        self._all: list = []

    def push(self, row) -> None:
        self._all.append(row)

    def take(self):
        return self._all.pop(0) if self._all else None
