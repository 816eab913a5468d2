"""Prefect task ``check_for_changes``: whether this run would retrain what the champion already is
(services.registration.unchanged_champion)."""

from __future__ import annotations

from prefect import task
from prefect.tasks import exponential_backoff

from prefixflow.services.preparation import PreparedData
from prefixflow.services.registration import Unchanged, unchanged_champion
from prefixflow.services.spec import PipelineSpec

from .policies import retry_on_io


@task(name="check_for_changes", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=retry_on_io)
def check_for_changes(spec: PipelineSpec, data: PreparedData) -> Unchanged | None:
    """The champion this run would only repeat (``None``: something changed, or there is no champion)."""
    return unchanged_champion(spec, data)
