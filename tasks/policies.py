"""Prefect policies the tasks share: the cache policy of the per-run tasks (train, evaluate, register), one
result per pipeline run, and the retry condition (retry failures, never those caused by the input).

The key is (task source, run key, spec hash, data fingerprint) of the task's ``ctx`` (a RunContext) and ``data``,
not the full inputs: timings and "reused" flags in the inputs change between attempts, and must not make a retried
flow redo work.
"""

from __future__ import annotations

import hashlib

from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy

from prefixflow import processes
from prefixflow.services.errors import is_user_error


def _run_scoped_key(context, parameters: dict) -> str:
    ctx, data = parameters["ctx"], parameters["data"]
    text = f"{ctx.run_key}|{ctx.spec.spec_hash()}|{data.fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()


PER_RUN = TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_run_scoped_key)


def retry_on_io(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry failures, except those caused by the input, and none once this process
    is stopping."""
    if processes.stop_requested():
        return False
    try:
        state.result()
    except Exception as exc:
        return not is_user_error(exc)
    return True
