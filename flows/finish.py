"""The tail every pipeline-shaped flow shares (``prefix_pipeline``, ``prefix_sweep``): evaluate the trained prefix
(candidate vs baseline vs champion), gate and register it, publish the run's summary, close the MLflow run."""

from __future__ import annotations

from collections.abc import Callable

from prefixflow.services import tracking
from prefixflow.services.evaluation import EvalReport
from prefixflow.services.preparation import PreparedData
from prefixflow.services.registration import Registration
from prefixflow.services.run import RunContext
from prefixflow.services.trained import TrainOutcome
from prefixflow.tasks.evaluate_prefix import evaluate_prefix
from prefixflow.tasks.register_prefix import register_prefix

Publish = Callable[[EvalReport, Registration, str], object]  # (report, registration, MLflow link) -> summary


def evaluate_and_register(ctx: RunContext, data: PreparedData, trained: TrainOutcome, publish: Publish,
                          tags: dict[str, str] | None = None) -> tuple[EvalReport, Registration, str]:
    """Evaluate ``trained``, register it (``tags`` on the version), ``publish`` the summary and close the run's
    MLflow run. Returns (report, registration, MLflow link). Inside a flow: the steps are Prefect tasks, cached
    per run (``ctx.run_key``)."""
    report = evaluate_prefix(ctx, data, trained)
    registration = register_prefix(ctx, data, trained, report, tags)
    link = tracking.run_link(ctx.mlflow_run_id)
    publish(report, registration, link)
    tracking.close_run(ctx.mlflow_run_id)
    return report, registration, link
