"""Prefect task ``publish_sweep_summary``: the sweep's table of trials and its plot, as a Prefect markdown artifact
and in the sweep's MLflow run (services.sweeps)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from prefixflow.services import sweeps, tracking
from prefixflow.services.spec import PipelineSpec
from prefixflow.services.sweeps import TrialRow


@task(name="publish_sweep_summary")
def publish_sweep_summary(spec: PipelineSpec, trials: list[TrialRow], best: TrialRow, registered: str,
                          mlflow_run_id: str, link: str) -> str:
    client = tracking.client()
    with tempfile.TemporaryDirectory(prefix="prefixflow-sweep-") as tmp:
        png = sweeps.plot(trials, Path(tmp) / "sweep.png")
        (Path(tmp) / "trials.json").write_text("[" + ",".join(t.model_dump_json() for t in trials) + "]")
        client.log_artifact(mlflow_run_id, str(Path(tmp) / "trials.json"), "sweep")
        if png is not None:
            client.log_artifact(mlflow_run_id, str(png), "sweep")
    markdown = sweeps.summary_markdown(spec, trials, best, registered, "sweep/sweep.png" if png else None, link)
    client.log_text(mlflow_run_id, markdown, "sweep/summary.md")
    create_markdown_artifact(markdown, key=f"{spec.client}-{spec.task}-sweep",
                             description=f"sweep of {spec.client}/{spec.task}: {len(trials)} trials")
    return markdown
