"""retrain_fleet: run the pipeline for many (client, task) specs at once, with at most N trainings
running at a time (a Prefect global concurrency limit that every training acquires), and one failed
pipeline not stopping the others."""

from __future__ import annotations

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from prefixflow.flows.pipeline import prefix_pipeline
from prefixflow.services.errors import is_user_error
from prefixflow.services.spec import PipelineSpec, check_fleet
from prefixflow.tasks.train_prefix import TRAINING_LIMIT


class FleetEntry(BaseModel):
    client: str
    task: str
    ok: bool
    outcome: str | None = None  # registered | unchanged (when ok)
    version: str | None = None
    champion: str | None = None
    gate_passed: bool | None = None
    metrics: dict[str, float] | None = None
    launched_at: float | None = None
    finished_at: float | None = None
    error: str | None = None


def set_training_limit(limit: int) -> None:
    """Create or update the global limit on concurrent trainings."""

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(TRAINING_LIMIT, limit)
        client.update_global_concurrency_limit(TRAINING_LIMIT, GlobalConcurrencyLimitUpdate(limit=limit, active=True))


@task(name="pipeline", task_run_name="{spec.client}-{spec.task}")
def run_pipeline(spec: PipelineSpec) -> FleetEntry:
    """One pipeline as a subflow; its failure becomes an entry, not an exception."""
    try:
        r = prefix_pipeline(spec, retrain="on_change")  # a fleet retrains what changed (unless the spec says)
    except Exception as exc:
        error = str(exc) if is_user_error(exc) else f"{type(exc).__name__}: {exc}"
        return FleetEntry(client=spec.client, task=spec.task, ok=False, error=error.splitlines()[0])
    if r.outcome == "unchanged":
        return FleetEntry(client=spec.client, task=spec.task, ok=True, outcome="unchanged",
                          version=r.unchanged.version, champion=r.unchanged.version)
    return FleetEntry(client=spec.client, task=spec.task, ok=True, outcome="registered", version=r.registration.version,
                      champion=r.registration.champion, gate_passed=r.report.gate.passed,
                      metrics=r.report.metrics["candidate"], launched_at=r.trained.launched_at,
                      finished_at=r.trained.finished_at)


@flow(name="retrain-fleet", task_runner=ThreadPoolTaskRunner(max_workers=8))
def retrain_fleet(specs: list[PipelineSpec], max_concurrent_trainings: int = 1) -> list[FleetEntry]:
    """Run every spec's pipeline; trainings wait for one of ``max_concurrent_trainings`` slots."""
    check_fleet(specs)  # the CLI checked already; a deployment's or a caller's list is checked here
    set_training_limit(max_concurrent_trainings)
    futures = [run_pipeline.submit(spec) for spec in specs]
    return [f.result() for f in futures]
