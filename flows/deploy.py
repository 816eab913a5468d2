"""Deployments: serve the pipeline for each spec on its cron schedule, with the spec as an editable
parameter (the Prefect UI renders PipelineSpec as a form, so a retrain with changed settings is a
click away). Needs a Prefect server (``PREFECT_API_URL``, e.g. from ``prefixflow stack env``)."""

from __future__ import annotations

from prefect import serve

from prefixflow.flows.pipeline import prefix_pipeline
from prefixflow.services.spec import PipelineSpec


def deployment_name(spec: PipelineSpec) -> str:
    return f"{spec.client}-{spec.task}"


def deployments(specs: list[PipelineSpec]) -> list:
    return [
        prefix_pipeline.to_deployment(
            name=deployment_name(s), cron=s.schedule,
            parameters={"spec": s.model_dump(mode="json"), "retrain": "on_change"},  # scheduled: retrain on change
            tags=["prefixflow", f"client:{s.client}"],
            description=f"Prefix pipeline for {s.client}/{s.task} on {s.base_model}",
        )
        for s in specs
    ]


def serve_specs(specs: list[PipelineSpec], limit: int | None = None) -> None:
    """Serve every spec's deployment from this process until interrupted (runs flows as subprocesses)."""

    serve(*deployments(specs), limit=limit)
