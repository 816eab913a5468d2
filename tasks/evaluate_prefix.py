"""Prefect task ``evaluate_prefix``: candidate vs baseline vs champion and the gate (services.evaluation)."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from prefixflow.services.evaluation import EvalReport, evaluate
from prefixflow.services.preparation import PreparedData
from prefixflow.services.run import RunContext
from prefixflow.services.trained import TrainOutcome

from .policies import PER_RUN, retry_on_io


@task(name="evaluate_prefix", cache_policy=PER_RUN, persist_result=True, retries=1,
      retry_delay_seconds=5, retry_condition_fn=retry_on_io)
def evaluate_prefix(ctx: RunContext, data: PreparedData, trained: TrainOutcome) -> EvalReport:
    """Prefect task over :func:`evaluate`; cached per pipeline run (``ctx.run_key``), so a retried flow skips it."""
    report = evaluate(ctx.spec, data, trained, ctx.mlflow_run_id)
    logger = get_run_logger()
    if report.precision:
        logger.info("generation precision: %s", report.precision["reason"])
    for name, ms in report.metrics.items():
        logger.info("%s: %s", name, ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    logger.info("gate %s: %s", "passed" if report.gate.passed else "refused", report.gate.reason)
    return report
