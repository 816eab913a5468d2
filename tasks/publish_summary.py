"""Prefect task ``publish_summary``: the run's summary as a Prefect markdown artifact (services.summary)."""

from __future__ import annotations

from prefect import task

from prefixflow.services.evaluation import EvalReport
from prefixflow.services.preparation import PreparedData
from prefixflow.services.registration import Registration
from prefixflow.services.spec import PipelineSpec
from prefixflow.services.summary import summary_markdown
from prefixflow.services.trained import TrainOutcome


@task(name="publish_summary")
def publish_summary(spec: PipelineSpec, data: PreparedData, trained: TrainOutcome, report: EvalReport,
                    reg: Registration, link: str) -> str:
    from prefect.artifacts import create_markdown_artifact

    markdown = summary_markdown(spec, data, trained, report, reg, link)
    create_markdown_artifact(markdown, key=f"{spec.client}-{spec.task}-summary",
                             description=f"{reg.name} v{reg.version}: candidate vs baseline vs champion")
    return markdown
