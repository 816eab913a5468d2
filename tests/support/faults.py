"""Fault injection for the kill and hang tests, through the product's one test seam: every rank of a training
calls the factory named by ``PREFIXFLOW_STEP_HOOK`` (``protocol.STEP_HOOK_ENV``; the tests' conftest sets it to
:func:`step_hook` and puts tests/ on ``PYTHONPATH`` for the ranks). The fault itself is ``PREFIXFLOW_FAULT``:

    kill:RANK:STEP[:ONCE_FILE]   that rank SIGKILLs itself after finishing STEP (after its checkpoint, if one
                                 is due then); with ONCE_FILE only the first time (the file records it), so a
                                 retried launch that passes STEP again survives
    hang:RANK:STEP               that rank sleeps forever after STEP

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
    if kind not in ("kill", "hang"):
        raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r}")

    def hook(trainer) -> None:
        if trainer.step == int(step) and trainer.acc.process_index == int(rank):
            if once:
                if os.path.exists(once[0]):
                    return
                Path(once[0]).write_text(str(trainer.step))
            sys.stdout.flush()
            sys.stderr.flush()
            if kind == "hang":
                while True:
                    time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def seeded_rng(request) -> random.Random:
    """A generator for one test, seeded from ``$PREFIXFLOW_TEST_SEED`` or at random; the seed is attached to
    the test's report (printed when it fails)."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    request.node.add_report_section("setup", "fault seed", f"{SEED_ENV}={seed} replays this test's faults\n")
    return random.Random(seed)


def kill_fault(rank: int, step: int, once_file: Path | None = None) -> dict[str, str]:
    """The environment that makes rank ``rank`` SIGKILL itself after step ``step`` (once, with ``once_file``)."""
    return {FAULT_ENV: f"kill:{rank}:{step}" + (f":{once_file}" if once_file else "")}


def hang_fault(rank: int, step: int) -> dict[str, str]:
    """The environment that makes rank ``rank`` hang forever after step ``step``."""
    return {FAULT_ENV: f"hang:{rank}:{step}"}
