"""Prefect task ``train_prefix``: launch (or resume) a training under Prefect's global concurrency limit and
report its progress as a Prefect progress artifact (launch.training)."""

from __future__ import annotations

from contextlib import nullcontext

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from prefixflow.launch.training import train
from prefixflow.services.preparation import PreparedData
from prefixflow.services.run import RunContext
from prefixflow.services.spec import PipelineSpec
from prefixflow.services.trained import TrainOutcome

from .policies import PER_RUN, retry_on_io

TRAINING_LIMIT = "prefixflow-training"  # Prefect global concurrency limit shared by all trainings


def training_slot():
    """One slot of the global training limit when the fleet has set one; otherwise no limit."""

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(TRAINING_LIMIT)
    except ObjectNotFound:
        return nullcontext()
    return concurrency(TRAINING_LIMIT, occupy=1, lease_duration=120)


class ProgressArtifact:
    """A Prefect progress artifact of the training, moved on by each ``step`` event (inside a task run)."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.id = create_progress_artifact(progress=0.0, key=f"{spec.client}-{spec.task}-training",
                                           description=f"training {spec.client}/{spec.task}: "
                                                       f"{spec.train.max_steps} steps")

    def __call__(self, event: dict) -> None:
        if event.get("event") == "step":
            update_progress_artifact(self.id, progress=100.0 * event["step"] / event["max_steps"])


@task(name="train_prefix", cache_policy=PER_RUN, persist_result=True, retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=retry_on_io)
def train_prefix(ctx: RunContext, data: PreparedData, pruning: dict | None = None) -> TrainOutcome:
    """Prefect task over :func:`train`. Retried failures relaunch all ranks and resume from the newest
    complete checkpoint; cached per pipeline run, so a retried flow does not train again. ``pruning``: the
    sweep trial this training is (its pruner may stop it early)."""
    return train(ctx.spec, data, ctx.run_key, ctx.mlflow_run_id, get_run_logger(), slot=training_slot,
                 listeners=(ProgressArtifact(ctx.spec),), pruning=pruning)
