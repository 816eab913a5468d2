"""Fault injection for the kill and hang tests.

The product has one seam for it: ``PREFIXFLOW_FAULT=kill|hang:RANK:STEP[:ONCE_FILE]``, read by the job every
rank runs (``prefixflow.launch.train_job``; the variable's name is ``protocol.FAULT_ENV``). What to break is
chosen here with a seeded generator whose seed is shown with a failing test; ``PREFIXFLOW_TEST_SEED=N``
replays it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from prefixflow.launch.protocol import FAULT_ENV

SEED_ENV = "PREFIXFLOW_TEST_SEED"


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
