"""Cache policy of the per-run tasks (train, evaluate, register): one result per pipeline run.

The key is (task source, run key, spec hash, data fingerprint), not the full inputs: timings and
"reused" flags in the inputs change between attempts, and must not make a retried flow redo work.
"""

from __future__ import annotations

import hashlib

from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy


def _run_scoped_key(context, parameters: dict) -> str:
    spec, data = parameters["spec"], parameters["data"]
    text = f"{parameters['run_key']}|{spec.spec_hash()}|{data.fingerprint}"
    return hashlib.sha256(text.encode()).hexdigest()


PER_RUN = TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_run_scoped_key)
