"""retrain_fleet: run the pipeline for many (client, task) specs at once, with at most N training jobs running at
a time (a Prefect global concurrency limit that every training job acquires), trainings of one base model that are
due together packed into one job (launch.packing), and one failed pipeline not stopping the others."""

from __future__ import annotations

from contextlib import nullcontext

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from prefixflow.flows.embedded import stopped_by
from prefixflow.flows.pipeline import prefix_pipeline
from prefixflow.launch.packing import PACK_SIZE, Packer, active_packer, pack_key, packing
from prefixflow.services import boundary
from prefixflow.services.errors import is_user_error, outage
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
def run_pipeline(spec: PipelineSpec, run_key: str | None = None) -> FleetEntry:
    """One pipeline as a subflow; its failure becomes an entry, not an exception. ``run_key``: the fleet run's key
    (each client's run is CLIENT/TASK/RUN_KEY; none: a new run each)."""
    packer = active_packer()
    try:
        with packer.expecting(pack_key(spec)) if packer is not None else nullcontext(), boundary.prefect_calls():
            # a fleet retrains what changed (unless the spec says)
            r = prefix_pipeline(spec, run_key=run_key, retrain="on_change")
    except Exception as exc:  # the input's fault, or a named service: one line says so
        error = str(exc) if is_user_error(exc) else outage(exc) or f"{type(exc).__name__}: {exc}"
        return FleetEntry(client=spec.client, task=spec.task, ok=False, error=error.splitlines()[0])
    if r.outcome == "unchanged":
        return FleetEntry(client=spec.client, task=spec.task, ok=True, outcome="unchanged",
                          version=r.unchanged.version, champion=r.unchanged.version)
    return FleetEntry(client=spec.client, task=spec.task, ok=True, outcome="registered", version=r.registration.version,
                      champion=r.registration.champion, gate_passed=r.report.gate.passed,
                      metrics=r.report.metrics["candidate"], launched_at=r.trained.launched_at,
                      finished_at=r.trained.finished_at)


@flow(name="retrain-fleet", task_runner=ThreadPoolTaskRunner(max_workers=8))
def retrain_fleet(specs: list[PipelineSpec], max_concurrent_trainings: int = 1,
                  pack: int = PACK_SIZE, run_key: str | None = None) -> list[FleetEntry]:
    """Run every spec's pipeline; training jobs wait for one of ``max_concurrent_trainings`` slots, and up to
    ``pack`` trainings that can share a job share one (1: none do). ``run_key``: rerun with the same key, a fleet
    finishes what it left (finished work is reused, trainings resume from their checkpoints). Pipelines run on the
    flow's task threads: see :func:`fleet_flow` for as many as the packs need."""
    check_fleet(specs)  # the CLI checked already; a deployment's or a caller's list is checked here
    set_training_limit(max_concurrent_trainings)
    with packing(Packer(pack) if pack > 1 else None):
        futures = [run_pipeline.submit(spec, run_key) for spec in specs]
        try:
            return [f.result() for f in futures]
        except BaseException as exc:  # a stop signal: the pipelines in the task threads stop too
            stopped_by(exc)
            raise


def fleet_threads(specs: int, pack: int, max_concurrent: int) -> int:
    """Pipelines running at once: enough to fill every running pack and gather the next (at least 8)."""
    return max(1, min(specs, max(8, (max_concurrent + 1) * max(pack, 1))))


def fleet_flow(specs: int, pack: int, max_concurrent: int):
    """:func:`retrain_fleet` with :func:`fleet_threads` task threads."""
    return retrain_fleet.with_options(task_runner=ThreadPoolTaskRunner(fleet_threads(specs, pack, max_concurrent)))
