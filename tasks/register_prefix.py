"""Prefect task ``register_prefix``: a model version and its aliases in the MLflow registry (services.registration)."""

from __future__ import annotations

from prefect import task
from prefect.tasks import exponential_backoff

from prefixflow.services.evaluation import EvalReport
from prefixflow.services.preparation import PreparedData
from prefixflow.services.registration import Registration, register
from prefixflow.services.spec import PipelineSpec
from prefixflow.services.trained import TrainOutcome

from .policies import PER_RUN, retry_on_io


@task(name="register_prefix", cache_policy=PER_RUN, persist_result=True, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=retry_on_io)
def register_prefix(spec: PipelineSpec, data: PreparedData, trained: TrainOutcome, report: EvalReport, run_key: str,
                    mlflow_run_id: str, extra_tags: dict[str, str] | None = None) -> Registration:
    """Prefect task over :func:`register` (retried with backoff; never creates a second version)."""
    from prefect.logging import get_run_logger

    reg = register(spec, data, trained, report, run_key, mlflow_run_id, extra_tags)
    get_run_logger().info("%s version %s %s; champion v%s, previous v%s", reg.name, reg.version,
                          "registered" if reg.created else "already registered by this run", reg.champion,
                          reg.previous)
    return reg
