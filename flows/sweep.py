"""The sweep: search a spec's ``sweep.space`` with Optuna, each trial a training through the ``train_prefix`` task
(strategies, GPU slots, the fleet's training limit, checkpoints and retries apply) and an MLflow child run; a
pruner stops unpromising trials at a validation; the best trial (lowest validation loss), optionally trained
again for ``sweep.final_max_steps``, goes through the pipeline's tail (evaluation, the gate, registration), its
version tagged with the sweep. The ask/tell loop itself is :func:`prefixflow.services.sweeps.run_trials`.

A killed sweep resumes with its run key (``prefixflow sweep SPEC --run-key K``): finished trials are not run
again, trials it left running continue from their checkpoints.
"""

from __future__ import annotations

import time
import uuid

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from prefixflow.flows.embedded import stopped_by
from prefixflow.flows.finish import evaluate_and_register
from prefixflow.services import sweeps
from prefixflow.services.run import RunContext, SweepResult
from prefixflow.services.spec import PipelineSpec, SpecError
from prefixflow.tasks.open_tracking_run import open_tracking_run
from prefixflow.tasks.prepare_data import prepare_data
from prefixflow.tasks.publish_sweep_summary import publish_sweep_summary
from prefixflow.tasks.train_prefix import train_prefix


@flow(name="prefix-sweep", task_runner=ThreadPoolTaskRunner(max_workers=16),
      flow_run_name="sweep-{spec.client}-{spec.task}")
def prefix_sweep(spec: PipelineSpec, run_key: str | None = None) -> SweepResult:
    """Prepare data → trials (Optuna, pruned on validation loss) → the best setting → evaluate → register."""
    if spec.sweep is None:
        raise SpecError(f"{spec.client}/{spec.task} has no `sweep:` section: add one (see docs/pipeline.md) or run "
                        "`prefixflow run` for a single training")
    t0 = time.time()
    key = run_key or str(flow_run.id or uuid.uuid4())
    data = prepare_data(spec)
    parent = open_tracking_run(spec, key, data)
    study = sweeps.open_study(spec, key)
    recovered = sweeps.recover(study)

    def start(trial_spec: PipelineSpec, trial_key: str, pruning: dict):
        child = open_tracking_run(trial_spec, trial_key, data, parent_run_id=parent)
        return train_prefix.submit(RunContext(spec=trial_spec, run_key=trial_key, mlflow_run_id=child), data,
                                   pruning=pruning)

    try:
        sweeps.run_trials(spec, key, study, start)
    except BaseException as exc:  # a stop signal: the trials training in task threads stop too
        stopped_by(exc)
        raise
    trials = sweeps.rows(study)
    best = sweeps.best_trial(trials)
    best_spec = spec.with_params(best.params)
    if spec.sweep.final_max_steps:  # the best setting, trained for the full budget
        best_spec = best_spec.with_params({"train.max_steps": spec.sweep.final_max_steps})
        trained = train_prefix(RunContext(spec=best_spec, run_key=f"{key}-final", mlflow_run_id=parent), data)
    else:  # the best trial's own prefix (already trained: no launch)
        trained = train_prefix(RunContext(spec=best_spec, run_key=best.run_key, mlflow_run_id=parent), data)
    tags = {"sweep": key, "sweep.trial": str(best.number), "sweep.trials": str(len(trials)),
            **{f"sweep.param.{k}": str(v) for k, v in best.params.items()}}

    def publish(report, registration, link):
        return publish_sweep_summary(spec, trials, best, f"{registration.name} v{registration.version}", parent,
                                     link)

    ctx = RunContext(spec=best_spec, run_key=key, mlflow_run_id=parent)
    report, registration, link = evaluate_and_register(ctx, data, trained, publish, tags)
    total = time.time() - t0
    return SweepResult(client=spec.client, task=spec.task, run_key=key, mlflow_run_id=parent, mlflow_link=link,
                       data=data, trained=trained, report=report, registration=registration,
                       timings={"total": total, "prepare": data.seconds, "evaluate": report.seconds},
                       trials=trials, best=best, recovered=recovered)
