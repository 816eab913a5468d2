"""Packing a fleet's trainings: pipeline runs that reach training at about the same time, with the same base model,
precision and machine, share one training job (:mod:`prefixflow.launch.pack_job`, one process, the base loaded
once). No Prefect here: the fleet flow activates a :class:`Packer` for its pipelines (:func:`packing`), and each
run's training (:mod:`prefixflow.launch.training`) hands its job to it when its spec can be packed
(:func:`pack_key`); every other training launches alone, as it would without a packer.

How a pack forms: a run's request waits in the packer. The fleet declares each pipeline that may still bring a
training of some kind (:meth:`Packer.expecting`); a pack of a kind is due when ``size`` requests of it wait, or no
declared pipeline of that kind is still on its way (and none arrived for ``gather_s``), or its oldest request has
waited ``max_wait_s``. Then a waiting run starts the pack's supervisor (a thread with that run's context).
The supervisor takes a training slot (the fleet's limit on concurrent trainings: a pack is one training) and the
GPUs, then up to ``size`` waiting requests of the kind, oldest first, launches the pack and routes each event to
its member's listeners and ``train.log``. A member's call returns as soon as its artifact is written or it failed,
while the others train on; one that the pack leaves unfinished (the pack crashed, hung or was killed) fails with
the pack's reason, and its retry resumes from its own newest checkpoint in a later pack.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from prefixflow import processes
from prefixflow.launch.command import build_one_process
from prefixflow.launch.gang import RunLock, run_launch
from prefixflow.launch.gpu_slots import gpu_slots
from prefixflow.launch.pack_job import PackJob
from prefixflow.launch.protocol import PACK_MODULE
from prefixflow.services.spec import PipelineSpec, TrainSpec
from prefixflow.services.storage import home

log = logging.getLogger(__name__)
GATHER_S = 1.0  # a due pack waits this long after the last arrival of its kind (retries arrive together)
MAX_WAIT_S = 60.0  # the longest a training waits for others to join its pack
PACK_SIZE = 16  # members per pack, by default (`prefixflow fleet --pack N`)


def pack_key(spec: PipelineSpec, pruning: dict | None = None) -> tuple | None:
    """What trainings must share to train in one pack, or None when this one trains alone: packs are one local
    process (strategy single), so multi-process and multi-machine trainings and sweep trials (their pruner stops
    one process) launch alone."""
    t = spec.train
    if pruning is not None or t.strategy != "single" or t.launcher != "local" or t.machines != 1:
        return None
    return spec.base_model, t.mixed_precision, t.gradient_checkpointing


@dataclass
class MemberEnd:
    """How one member's training ended: ``reason`` ok | user_error | failed (``error`` says why)."""

    reason: str
    error: str | None = None
    launched_at: float = 0.0
    finished_at: float = 0.0


@dataclass
class PackRequest:
    """One run's training, handed to the packer with its job file written and its run lock held."""

    key: tuple
    name: str  # unique in the fleet: CLIENT/TASK/RUN_KEY
    job_file: Path
    lock: RunLock
    train: TrainSpec
    on_event: Callable[[dict], None]  # the run's progress and checkpoint mirror
    slot: Callable[[], AbstractContextManager]
    log_file: Path  # the run's train.log: its own events are appended there
    arrived: float = field(default_factory=time.monotonic)
    end: MemberEnd | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, end: MemberEnd) -> None:
        if not self.done.is_set():
            self.end = end
            self.done.set()


class Packer:
    """Forms packs of waiting trainings and supervises them (see the module docstring). Thread-safe."""

    def __init__(self, size: int = PACK_SIZE, gather_s: float = GATHER_S, max_wait_s: float = MAX_WAIT_S,
                 rows_per_forward: int | None = None) -> None:
        if size < 2:
            raise ValueError(f"a pack holds at least 2 trainings; got {size}")
        self.size, self.gather_s, self.max_wait_s, self.rows_per_forward = size, gather_s, max_wait_s, rows_per_forward
        self._cond = threading.Condition()
        self._waiting: dict[tuple, list[PackRequest]] = {}
        self._forming: set[tuple] = set()  # kinds whose supervisor waits for a slot
        self._expected: list[list] = []  # [kind] of each declared pipeline that has not handed its training yet

    @contextmanager
    def expecting(self, kind: tuple | None) -> Iterator[None]:
        """Within the block (one pipeline run, in its thread), this pipeline may hand a training of ``kind``: packs
        of that kind wait for it (up to ``max_wait_s``) until it does, or the block ends (it failed earlier, its
        data was unchanged, ...)."""
        entry = [kind]
        with self._cond:
            self._expected.append(entry)
        token = _PIPELINE.set(entry)
        try:
            yield
        finally:
            _PIPELINE.reset(token)
            self._arrived(entry)

    def _arrived(self, entry: list | None) -> None:
        with self._cond:
            if entry is not None and any(e is entry for e in self._expected):
                self._expected = [e for e in self._expected if e is not entry]
                self._cond.notify_all()

    def train(self, request: PackRequest) -> MemberEnd:
        """Wait for ``request``'s training to end in a pack (starting one when it is due)."""
        with self._cond:
            self._waiting.setdefault(request.key, []).append(request)
            self._cond.notify_all()
        self._arrived(_PIPELINE.get())
        while not request.done.wait(0.2):
            if processes.stop_requested():  # its pack's supervisor stops the pack
                raise processes.Stopped(f"stopped while training {request.name} in a pack")
            with self._cond:
                if self._due(request.key):
                    self._forming.add(request.key)
                    context = contextvars.copy_context()  # this run's Prefect context: the slot, logging
                    threading.Thread(target=context.run, args=(self._supervise, request.key), daemon=True,
                                     name=f"prefixflow-pack-{request.key[0]}").start()
        return request.end

    def _due(self, key: tuple) -> bool:
        waiting = self._waiting.get(key, [])
        if not waiting or key in self._forming:
            return False
        now = time.monotonic()
        on_the_way = any(e[0] == key for e in self._expected)
        return (len(waiting) >= self.size or now - waiting[0].arrived >= self.max_wait_s
                or (not on_the_way and now - waiting[-1].arrived >= self.gather_s))

    def _claim(self, key: tuple) -> list[PackRequest]:
        with self._cond:
            waiting = self._waiting.get(key, [])
            members, self._waiting[key] = waiting[: self.size], waiting[self.size :]
            self._forming.discard(key)
            self._cond.notify_all()
            return members

    def _supervise(self, key: tuple) -> None:
        members: list[PackRequest] = []
        try:
            with self._cond:
                first = self._waiting[key][0]
            with first.slot(), gpu_slots(1) as device_env:
                members = self._claim(key)
                if members:
                    self._launch(members, device_env)
        except processes.Stopped:  # the command is stopping: its members' threads stop on their own
            return
        except BaseException as err:  # the slot, the launch itself: every member still waiting learns why
            members = members or self._claim(key)
            for m in members:
                m.finish(MemberEnd("failed", f"the pack could not run: {type(err).__name__}: {err}"))
            if not isinstance(err, Exception):
                raise

    def _launch(self, members: list[PackRequest], device_env: dict) -> None:
        folder = home() / "packs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        by_name = {m.name: m for m in members}
        PackJob({m.name: str(m.job_file) for m in members}, self.rows_per_forward).to_json(folder / "pack.json")
        launch = build_one_process(folder / "pack.json", PACK_MODULE)
        launch.env.update(device_env)
        launched = time.time()
        log.info("launching a pack of %d trainings (%s): %s", len(members), folder, " ".join(launch.argv))

        def route(event: dict) -> None:
            member = by_name.get(event.get("member", ""))
            if member is None:
                return
            logs[member.name].write(json.dumps(event, default=str) + "\n")
            logs[member.name].flush()
            kind = event.get("event")
            if kind == "failed":
                member.finish(MemberEnd("user_error" if event.get("user_error") else "failed",
                                        f"{event.get('error')} (full log: {folder / 'pack.log'})", launched,
                                        time.time()))
                return
            member.on_event(event)
            if kind == "artifact":
                member.finish(MemberEnd("ok", None, launched, time.time()))

        hang_s = max(m.train.hang_timeout_s for m in members)
        with ExitStack() as stack:  # each member's own train.log, open for the pack's life
            logs = {m.name: stack.enter_context(open(m.log_file, "a", encoding="utf-8")) for m in members}
            result = run_launch(launch, route, log_file=folder / "pack.log", hang_timeout_s=hang_s,
                                lock=members[0].lock, also_held=[m.lock for m in members[1:]])
        reason = "user_error" if result.reason == "user_error" else "failed"
        why = result.error or f"the pack ended without finishing it (exit code {result.returncode})"
        for m in members:
            m.finish(MemberEnd(reason, f"training pack {result.reason}: {why}; full log: {folder / 'pack.log'}",
                               launched, time.time()))


_PACKER: ContextVar[Packer | None] = ContextVar("prefixflow_packer", default=None)
_PIPELINE: ContextVar[list | None] = ContextVar("prefixflow_packed_pipeline", default=None)


@contextmanager
def packing(packer: Packer | None) -> Iterator[None]:
    """Within the block (and the task threads Prefect starts from it), trainings that can be packed go to
    ``packer``; None: every training launches alone."""
    token = _PACKER.set(packer)
    try:
        yield
    finally:
        _PACKER.reset(token)


def active_packer() -> Packer | None:
    return _PACKER.get()
