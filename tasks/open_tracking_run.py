"""Prefect task ``open_tracking_run``: the MLflow run of a pipeline run, tagged with its Prefect flow run
(services.tracking), with its data as dataset inputs (services.lineage)."""

from __future__ import annotations

from prefect import task
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from prefixflow.services.lineage import log_data
from prefixflow.services.preparation import PreparedData
from prefixflow.services.tracking import flatten, open_run

from .policies import retry_on_io


@task(name="open_tracking_run", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=retry_on_io)
def open_tracking_run(spec, run_key: str, data: PreparedData, parent_run_id: str | None = None) -> str:
    """Prefect task: the MLflow run of this pipeline run (idempotent by run key, its data logged once); with
    ``parent_run_id`` a child run of it (a sweep's trial)."""

    tags = {"client": spec.client, "task": spec.task, "prefect.flow_run_id": str(flow_run.id or ""),
            "prefect.flow_run_name": str(flow_run.name or ""), "data_fingerprint": data.fingerprint,
            "spec_hash": spec.spec_hash(), "base_model": spec.base_model}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run_id = open_run(spec.experiment, run_key, f"{spec.task}-{run_key[:8]}", tags,
                      flatten("", spec.model_dump(mode="json")))
    log_data(run_id, spec, data)  # MLflow keeps a dataset input once per run: a retry adds nothing
    return run_id
