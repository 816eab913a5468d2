"""Fault injection for the kill and hang tests, through the product's one test seam: every rank of a training
calls the factory named by ``PREFIXFLOW_STEP_HOOK`` (``protocol.STEP_HOOK_ENV``; the tests' conftest sets it to
:func:`step_hook` and puts tests/ on ``PYTHONPATH`` for the ranks). The fault itself is ``PREFIXFLOW_FAULT``:

    kill:RANK:STEP[:ONCE_FILE]   that rank SIGKILLs itself after finishing STEP (after its checkpoint, if one
                                 is due then); with ONCE_FILE only the first time (the file records it), so a
                                 retried launch that passes STEP again survives
    hang:RANK:STEP               that rank sleeps forever after STEP
    linger:RANK:STEP             that rank never exits once its job is done (after its artifact and usage events):
                                 a teardown that hangs once the work is written
    fill:RANK:STEP:FILE          that rank writes FILE until its disk is full after STEP (once: an existing FILE
                                 is left alone), then goes on; deleting FILE frees the disk
    pause:RANK:STEP:FILE         that rank creates FILE after STEP and waits until the test deletes it (a window
                                 in which the test breaks something around a training that is surely running)
    poison:RANK:STEP:PART        the training whose checkpoint folder's path contains PART (one member of a pack)
                                 fills its prefix with NaN after every step from STEP on (a resumed run too), so
                                 its next loss is not finite

What to break is chosen with a seeded generator whose seed a failing test shows; ``PREFIXFLOW_TEST_SEED=N``
replays it.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

FAULT_ENV = "PREFIXFLOW_FAULT"
SEED_ENV = "PREFIXFLOW_TEST_SEED"
STEP_HOOK = "support.faults:step_hook"  # the value of PREFIXFLOW_STEP_HOOK


def step_hook():
    """Called once per rank: the hook of ``$PREFIXFLOW_FAULT``, or None when no fault is asked for."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kind, rank, step, *once = spec.split(":", 3)
    if kind not in ("kill", "hang", "linger", "fill", "pause", "poison"):
        raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r}")

    def hook(trainer) -> None:
        if kind == "poison":
            if trainer.step >= int(step) and once[0] in str(trainer.checkpoint_dir):
                import torch

                with torch.no_grad():
                    for param in trainer.model.prefix.parameters():
                        param.fill_(float("nan"))
            return
        if trainer.step == int(step) and trainer.acc.process_index == int(rank):
            if kind == "linger":  # the job's very last call, after its artifact and usage events
                os._exit = lambda code: _sleep_forever()
                return
            if kind == "fill":
                fill_disk(Path(once[0]))
                return
            if kind == "pause":
                marker = Path(once[0])
                marker.write_text(str(trainer.step))
                while marker.exists():
                    time.sleep(0.2)
                return
            if once:
                if os.path.exists(once[0]):
                    return
                Path(once[0]).write_text(str(trainer.step))
            sys.stdout.flush()
            sys.stderr.flush()
            if kind == "hang":
                _sleep_forever()
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


def fill_disk(ballast: Path) -> None:
    """Write ``ballast`` until the device holding it has no space left (nothing if it exists already)."""
    if ballast.exists():
        return
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        for size in (1 << 20, 4096, 1):  # down to the last byte the device has
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def fill_fault(rank: int, step: int, ballast: Path) -> dict[str, str]:
    """The environment that makes rank ``rank`` fill the disk holding ``ballast`` after step ``step``."""
    return {FAULT_ENV: f"fill:{rank}:{step}:{ballast}"}


def pause_fault(rank: int, step: int, marker: Path) -> dict[str, str]:
    """The environment that makes rank ``rank`` create ``marker`` after step ``step`` and wait until it is gone."""
    return {FAULT_ENV: f"pause:{rank}:{step}:{marker}"}


def seeded_rng(request) -> random.Random:
    """A generator for one test, seeded from ``$PREFIXFLOW_TEST_SEED`` or at random; the seed is attached to
    the test's report (printed when it fails)."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    request.node.add_report_section("setup", "fault seed", f"{SEED_ENV}={seed} replays this test's faults\n")
    return random.Random(seed)


def kill_fault(rank: int, step: int, once_file: Path | None = None) -> dict[str, str]:
    """The environment that makes rank ``rank`` SIGKILL itself after step ``step`` (once, with ``once_file``)."""
    return {FAULT_ENV: f"kill:{rank}:{step}" + (f":{once_file}" if once_file else "")}


def linger_fault(rank: int, step: int) -> dict[str, str]:
    """The environment that makes rank ``rank`` (having run past step ``step``) hang at the job's very end."""
    return {FAULT_ENV: f"linger:{rank}:{step}"}


def hang_fault(rank: int, step: int) -> dict[str, str]:
    """The environment that makes rank ``rank`` hang forever after step ``step``."""
    return {FAULT_ENV: f"hang:{rank}:{step}"}
