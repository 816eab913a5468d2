"""Deployments: serve the pipeline for each spec on its cron schedule, with the spec as an editable
parameter (the Prefect UI renders PipelineSpec as a form, so a retrain with changed settings is a
click away). Needs a Prefect server (``PREFECT_API_URL``, e.g. from ``prefixflow stack env``).

A spec with ``trigger: on_new_data`` also gets a deployment trigger: the serving process watches its data
sources (``services.data_watch``) and emits a ``prefixflow.data.changed`` event for the (client, task) once new
data has settled; the server's automation runs the deployment (``retrain: on_change``) for it."""

from __future__ import annotations

import logging

from prefect import serve
from prefect.events import emit_event
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from prefixflow import settings
from prefixflow.flows.pipeline import prefix_pipeline
from prefixflow.services.data_watch import WATCH_EVENT, DataWatcher, watch_resource
from prefixflow.services.spec import PipelineSpec

log = logging.getLogger(__name__)


def deployment_name(spec: PipelineSpec) -> str:
    return f"{spec.client}-{spec.task}"


def watched_sources(spec: PipelineSpec) -> list[str]:
    """What a ``trigger: on_new_data`` spec's watcher polls: its data source, and its test source if any."""
    return [spec.data.source, *([spec.data.test_source] if spec.data.test_source else [])]


def _triggers(spec: PipelineSpec) -> list[DeploymentEventTrigger]:
    if spec.trigger != "on_new_data":
        return []
    return [DeploymentEventTrigger(
        name=f"new data for {spec.client}/{spec.task}", expect={WATCH_EVENT},
        match={"prefect.resource.id": watch_resource(spec.client, spec.task)})]


def deployments(specs: list[PipelineSpec]) -> list:
    return [
        prefix_pipeline.to_deployment(
            name=deployment_name(s), cron=s.schedule, triggers=_triggers(s),
            parameters={"spec": s.model_dump(mode="json"), "retrain": "on_change"},  # scheduled: retrain on change
            tags=["prefixflow", f"client:{s.client}"],
            description=f"Prefix pipeline for {s.client}/{s.task} on {s.base_model}",
        )
        for s in specs
    ]


def data_watcher(specs: list[PipelineSpec], poll_s: float) -> DataWatcher | None:
    """The watcher of every ``trigger: on_new_data`` spec's sources (None when no spec asks for one); each
    settled change emits one ``prefixflow.data.changed`` event for its (client, task)."""
    by_name = {f"{s.client}/{s.task}": s for s in specs if s.trigger == "on_new_data"}
    if not by_name:
        return None

    def report(name: str, sources: list[str]) -> None:
        spec = by_name[name]
        log.warning("new data for %s in %s: starting its deployment", name, ", ".join(sources))
        emit_event(event=WATCH_EVENT,
                   resource={"prefect.resource.id": watch_resource(spec.client, spec.task),
                             "prefect.resource.name": name},
                   payload={"sources": sources})

    return DataWatcher({name: watched_sources(s) for name, s in by_name.items()}, report, poll_s)


def serve_specs(specs: list[PipelineSpec], limit: int | None = None) -> None:
    """Serve every spec's deployment from this process until interrupted (runs flows as subprocesses), with
    the data watcher of the ``trigger: on_new_data`` specs running beside them."""

    watcher = data_watcher(specs, settings.watch_interval_s())  # the command checked the setting
    if watcher is not None:
        watcher.start()
    try:
        serve(*deployments(specs), limit=limit)
    finally:
        if watcher is not None:
            watcher.stop()
