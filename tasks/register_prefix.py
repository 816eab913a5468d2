"""Prefect task ``register_prefix``: a model version and its aliases in the MLflow registry (services.registration)."""

from __future__ import annotations

from prefect import task
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from prefixflow.services.evaluation import EvalReport
from prefixflow.services.preparation import PreparedData
from prefixflow.services.registration import Registration, register
from prefixflow.services.run import RunContext
from prefixflow.services.trained import TrainOutcome

from .policies import PER_RUN, retry_on_io

LOCK_PREFIX = "prefixflow-register-"  # + the registered model: a Prefect global concurrency limit of 1


def registration_lock(name: str):
    """One registration of ``name`` at a time, across processes and machines that share the Prefect API (the
    embedded API's database is shared by the commands of one state folder): Prefect's global concurrency limit
    ``prefixflow-register-NAME`` with one slot, created on first use. A holder that dies frees it when its
    lease ends."""
    limit = f"{LOCK_PREFIX}{name}"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(limit, 1)
    return concurrency(limit, occupy=1, lease_duration=300, strict=True)


@task(name="register_prefix", cache_policy=PER_RUN, persist_result=True, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_condition_fn=retry_on_io)
def register_prefix(ctx: RunContext, data: PreparedData, trained: TrainOutcome, report: EvalReport,
                    extra_tags: dict[str, str] | None = None) -> Registration:
    """Prefect task over :func:`register` (retried with backoff; never creates a second version)."""
    with registration_lock(ctx.spec.registered_model):
        reg = register(ctx.spec, data, trained, report, ctx.run_key, ctx.mlflow_run_id, extra_tags)
    if reg.note:
        get_run_logger().warning(reg.note)
    get_run_logger().info("%s version %s %s; champion v%s, previous v%s", reg.name, reg.version,
                          "registered" if reg.created else "already registered by this run", reg.champion,
                          reg.previous)
    return reg
