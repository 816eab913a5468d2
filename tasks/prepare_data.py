"""Prefect task ``prepare_data``: load, clean, split and fingerprint a task's data (services.preparation)."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from prefixflow.services.preparation import PreparedData, prepare
from prefixflow.services.spec import PipelineSpec

from .policies import retry_on_io


@task(name="prepare_data", retries=2, retry_delay_seconds=[2, 8],
      retry_condition_fn=retry_on_io)
def prepare_data(spec: PipelineSpec) -> PreparedData:
    """Prefect task over :func:`prepare` (retried on I/O errors, never on bad input)."""

    result = prepare(spec)
    c = result.counts
    get_run_logger().info(
        "data %s: %d rows read, %d rejected, %d duplicates -> train %d / validation %d / test %d; fingerprint %s%s",
        "reused" if result.reused else "prepared", c["read"], c["rejected"], c["duplicates"], c["train"],
        c["validation"], c["test"], result.fingerprint[:12], f"; rejected rows in {result.rejected_uri}"
        if result.rejected_uri else "")
    return result

