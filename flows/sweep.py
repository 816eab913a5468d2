"""The sweep: search a spec's ``sweep.space`` with Optuna, each trial a training through the ``train_prefix`` task
(strategies, GPU slots, the fleet's training limit, checkpoints and retries apply) and an MLflow child run; a
pruner stops unpromising trials at a validation; the best trial (lowest validation loss), optionally trained
again for ``sweep.final_max_steps``, goes through evaluation, the gate and registration like a single run, its
version tagged with the sweep.

A killed sweep resumes with its run key (``prefixflow sweep SPEC --run-key K``): finished trials are not run
again, trials it left running continue from their checkpoints.
"""

from __future__ import annotations

import time
import uuid

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from prefixflow.services import sweeps, tracking
from prefixflow.services.evaluation import EvalReport
from prefixflow.services.preparation import PreparedData
from prefixflow.services.registration import Registration
from prefixflow.services.spec import PipelineSpec, SpecError
from prefixflow.services.sweeps import TrialRow
from prefixflow.services.trained import TrainOutcome
from prefixflow.tasks.evaluate_prefix import evaluate_prefix
from prefixflow.tasks.open_tracking_run import open_tracking_run
from prefixflow.tasks.prepare_data import prepare_data
from prefixflow.tasks.publish_sweep_summary import publish_sweep_summary
from prefixflow.tasks.register_prefix import register_prefix
from prefixflow.tasks.train_prefix import train_prefix


class SweepResult(BaseModel):
    client: str
    task: str
    run_key: str
    mlflow_run_id: str
    mlflow_link: str
    data: PreparedData
    trials: list[TrialRow]
    best: TrialRow
    recovered: list[int]  # trials a killed earlier attempt left running (queued again)
    trained: TrainOutcome
    report: EvalReport
    registration: Registration
    seconds: float


def _run_trials(spec: PipelineSpec, data: PreparedData, key: str, parent: str, study) -> None:
    """Ask the study for trials (``sweep.concurrent`` at a time) and train them until ``sweep.trials`` are done."""
    import optuna

    sweep = spec.sweep
    space = sweeps.distributions(sweep.space)
    while (done := sweeps.finished(study)) < sweep.trials:
        batch = [study.ask(space) for _ in range(min(sweep.concurrent, sweep.trials - done))]
        futures = []
        for trial in batch:
            trial_key = sweeps.trial_key(key, trial.params)
            trial.set_user_attr("run_key", trial_key)
            same = sweeps.earlier(study, trial.params)
            if same is not None:  # the sampler repeated a setting: its result, without training it again
                trial.set_user_attr("steps", same.user_attrs.get("steps"))
                trial.set_user_attr("repeat_of", same.number)
                if same.state == optuna.trial.TrialState.COMPLETE:
                    study.tell(trial, same.value)
                else:
                    last = max(same.intermediate_values, default=None)
                    if last is not None:
                        trial.report(same.intermediate_values[last], last)
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            try:
                trial_spec = spec.with_params(trial.params)
            except SpecError as err:  # a combination the spec refuses (e.g. a batch size): a failed trial
                futures.append((trial, None, str(err).splitlines()[-1].strip()))
                continue
            child = open_tracking_run(trial_spec, trial_key, data.fingerprint, parent_run_id=parent)
            futures.append((trial, train_prefix.submit(trial_spec, data, trial_key, child,
                                                       pruning=sweeps.pruning(study, trial, spec)), None))
        for trial, future, refused in futures:
            if future is None:
                trial.set_user_attr("error", refused)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            try:
                outcome: TrainOutcome = future.result()
            except Exception as err:  # the trial failed after its retries; the sweep goes on
                trial.set_user_attr("error", f"{type(err).__name__}: {str(err).splitlines()[0]}"[:500])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            trial.set_user_attr("steps", outcome.steps)
            trial.set_user_attr("seconds", round(outcome.seconds, 1))
            if outcome.pruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            elif outcome.best_eval_loss is None:
                trial.set_user_attr("error", "no validation loss (the data has no validation split)")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, outcome.best_eval_loss)


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
    parent = open_tracking_run(spec, key, data.fingerprint)
    study = sweeps.open_study(spec, key)
    recovered = sweeps.recover(study)
    _run_trials(spec, data, key, parent, study)
    trials = sweeps.rows(study)
    complete = [t for t in trials if t.state == "COMPLETE"]
    if not complete:
        raise RuntimeError(f"no trial of the sweep finished ({len(trials)} failed or pruned): "
                           + "; ".join(f"trial {t.number}: {t.error or t.state}" for t in trials[:5]))
    best = min(complete, key=lambda t: t.value)
    best_spec = spec.with_params(best.params)
    if spec.sweep.final_max_steps:  # the best setting, trained for the full budget
        best_spec = best_spec.with_params({"train.max_steps": spec.sweep.final_max_steps})
        trained = train_prefix(best_spec, data, f"{key}-final", parent)
    else:  # the best trial's own prefix (already trained: no launch)
        trained = train_prefix(best_spec, data, best.run_key, parent)
    report = evaluate_prefix(best_spec, data, trained, key, parent)
    tags = {"sweep": key, "sweep.trial": str(best.number), "sweep.trials": str(len(trials)),
            **{f"sweep.param.{k}": str(v) for k, v in best.params.items()}}
    registration = register_prefix(best_spec, data, trained, report, key, parent, tags)
    link = tracking.run_link(parent)
    publish_sweep_summary(spec, trials, best, f"{registration.name} v{registration.version}", parent, link)
    tracking.close_run(parent)
    return SweepResult(client=spec.client, task=spec.task, run_key=key, mlflow_run_id=parent, mlflow_link=link,
                       data=data, trials=trials, best=best, recovered=recovered, trained=trained, report=report,
                       registration=registration, seconds=time.time() - t0)
