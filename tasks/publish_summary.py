"""Prefect task ``publish_summary``: the run's summary as a Prefect markdown artifact (services.summary)."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from prefixflow.services.evaluation import EvalReport
from prefixflow.services.preparation import PreparedData
from prefixflow.services.registration import Registration, Unchanged
from prefixflow.services.spec import PipelineSpec
from prefixflow.services.summary import summary_markdown, unchanged_markdown
from prefixflow.services.trained import TrainOutcome


@task(name="publish_summary")
def publish_summary(spec: PipelineSpec, data: PreparedData, trained: TrainOutcome | None, report: EvalReport | None,
                    reg: Registration | None, link: str, unchanged: Unchanged | None = None) -> str:
    """The summary of a run that registered a version, or (``unchanged``) of one that had nothing to train."""

    if unchanged is not None:
        markdown = unchanged_markdown(spec, data, unchanged)
        description = f"{unchanged.name}: unchanged, champion v{unchanged.version} kept"
    else:
        markdown = summary_markdown(spec, data, trained, report, reg, link)
        description = f"{reg.name} v{reg.version}: candidate vs baseline vs champion"
    create_markdown_artifact(markdown, key=f"{spec.client}-{spec.task}-summary", description=description)
    return markdown
