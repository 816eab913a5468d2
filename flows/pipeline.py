"""The pipeline: one flow run per (client, task) that prepares data, trains, evaluates, gates and
registers a prefix.

Retries: I/O tasks retry with exponential backoff, training retries by relaunching every rank from
the newest checkpoint, and the flow itself retries once; results are persisted and cached per
pipeline run (``run_key``, the flow run id unless given), so a retried flow skips finished work.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from prefixflow.flows.finish import evaluate_and_register
from prefixflow.services import tracking
from prefixflow.services.run import RunContext, RunResult
from prefixflow.services.spec import PipelineSpec
from prefixflow.tasks.check_for_changes import check_for_changes
from prefixflow.tasks.open_tracking_run import open_tracking_run
from prefixflow.tasks.prepare_data import prepare_data
from prefixflow.tasks.publish_summary import publish_summary
from prefixflow.tasks.train_prefix import train_prefix


def _mark_failed(flow, flow_run_obj, state) -> None:
    """on_failure hook: mark this run's MLflow run FAILED (nothing is registered from a failed run)."""
    try:
        spec = PipelineSpec.model_validate(flow_run_obj.parameters["spec"])
        run_key = flow_run_obj.parameters.get("run_key") or str(flow_run_obj.id)
        exp = tracking.client().get_experiment_by_name(spec.experiment)
        run = tracking.find_run(exp.experiment_id, run_key) if exp else None
        if run is not None:
            tracking.close_run(run.info.run_id, "FAILED")
    except Exception:  # the hook must never mask the flow's own error
        pass


@flow(name="prefix-pipeline", retries=1, retry_delay_seconds=5, persist_result=True, on_failure=[_mark_failed],
      flow_run_name="{spec.client}-{spec.task}")
def prefix_pipeline(spec: PipelineSpec, run_key: str | None = None,
                    retrain: Literal["always", "on_change"] = "always") -> RunResult:
    """Prepare data → train → evaluate (candidate vs baseline vs champion) → register, for one spec.
    ``retrain``: used when the spec does not set ``retrain``; with ``on_change`` a run whose data, base model and
    training settings equal the champion's ends after preparing the data (outcome ``unchanged``)."""
    t0 = time.time()
    key = run_key or str(flow_run.id or uuid.uuid4())
    data = prepare_data(spec)
    if (spec.retrain or retrain) == "on_change":
        unchanged = check_for_changes(spec, data)
        if unchanged is not None:
            publish_summary(spec, data, None, None, None, "", unchanged)
            return RunResult(client=spec.client, task=spec.task, run_key=key, outcome="unchanged", data=data,
                             unchanged=unchanged, timings={"total": time.time() - t0, "prepare": data.seconds})
    ctx = RunContext(spec=spec, run_key=key, mlflow_run_id=open_tracking_run(spec, key, data))
    trained = train_prefix(ctx, data)
    report, registration, link = evaluate_and_register(
        ctx, data, trained, lambda report, reg, link: publish_summary(spec, data, trained, report, reg, link))
    total = time.time() - t0
    work = {"prepare": data.seconds, "train": trained.seconds, "evaluate": report.seconds}
    return RunResult(client=spec.client, task=spec.task, run_key=key, mlflow_run_id=ctx.mlflow_run_id,
                     mlflow_link=link, data=data, trained=trained, report=report, registration=registration,
                     timings={"total": total, **work, "orchestration": total - sum(work.values())})
