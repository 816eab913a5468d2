"""Sweeps (no Prefect): one Optuna study per sweep run, its search space, the ask/tell driver that trains trials
through a caller's ``start`` (:func:`run_trials`), trials that survive a crash, and the sweep's summary (a
table of trials and a plot of the metric against prefix length and learning rate).

The study is stored in ``$PREFIXFLOW_SWEEP_STORAGE`` (any SQLAlchemy URL Optuna accepts, e.g. the stack's
database) or else ``$PREFIXFLOW_HOME/sweeps/optuna.db`` (SQLite), named ``CLIENT-TASK-RUNKEY``: rerunning a sweep
with its run key continues the same study. The objective is the trial's best validation loss (minimized).

Optuna and matplotlib are deferred to the functions that use them: the CLI imports this module.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from prefixflow import settings
from prefixflow.services.spec import SEARCHABLE, PipelineSpec, SearchRange, SpecError
from prefixflow.services.storage import home


class TrialRow(BaseModel):
    """One trial as the summary shows it. ``state``: COMPLETE, PRUNED, FAIL or RUNNING; ``value``: its best
    validation loss (for a pruned trial: the loss it was pruned at)."""

    number: int
    state: str
    value: float | None
    params: dict
    steps: int | None = None
    run_key: str | None = None
    seconds: float | None = None
    error: str | None = None


def storage_url() -> str:
    url = settings.sweep_storage()
    if url:
        return url
    folder = home() / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def study_name(spec: PipelineSpec, run_key: str) -> str:
    return f"{spec.client}-{spec.task}-{run_key}"


def open_study(spec: PipelineSpec, run_key: str):
    """The sweep's study (created, or loaded to continue it) with the spec's sampler and pruner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = spec.sweep
    if sweep.sampler == "grid":
        sampler = _ask_tell_grid(sweep.space, seed=sweep.seed)
    elif sweep.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=sweep.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=max(1, sweep.startup_trials))
    study = optuna.create_study(study_name=study_name(spec, run_key), storage=storage_url(), sampler=sampler,
                                pruner=make_pruner(pruner_config(spec)), direction="minimize", load_if_exists=True)
    if sweep.start_with_spec and not study.trials:
        own = spec_params(spec)
        if own:
            study.enqueue_trial(own)
    return study


def _ask_tell_grid(space: dict, seed: int | None):
    """Optuna's GridSampler without its ``study.stop()`` once the grid is used up: outside ``study.optimize`` (our
    ask/tell driver) that call raises, so the last trial of a grid sweep failed the sweep. :func:`run_trials`
    counts trials itself; a grid point asked again is answered from its earlier trial, not trained again."""
    import optuna

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Grid(space, seed=seed)


def spec_params(spec: PipelineSpec) -> dict:
    """The spec's own values of the searched fields that lie inside the space (trial 0 of a sweep)."""
    out = {}
    for key, choices in spec.sweep.space.items():
        section, name = key.split(".", 1)
        value = getattr(getattr(spec, section), name)
        inside = value in choices if isinstance(choices, list) else (
            value is not None and choices.low <= value <= choices.high)
        if inside:
            out[key] = value
    return out


def pruner_config(spec: PipelineSpec) -> dict:
    """The pruner as plain data: the training job builds the same pruner from it (Optuna does not store it)."""
    return {"kind": spec.sweep.pruner, "startup_trials": spec.sweep.startup_trials,
            "min_resource": max(1, spec.train.eval_every or 1), "max_resource": spec.train.max_steps}


def make_pruner(config: dict):
    import optuna

    if config["kind"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=config["startup_trials"], n_warmup_steps=0)
    if config["kind"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=config["min_resource"],
                                              max_resource=config["max_resource"], reduction_factor=3)
    return optuna.pruners.NopPruner()


def distributions(space: dict) -> dict:
    """Optuna distributions of a spec's search space."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, value in space.items():
        if isinstance(value, list):
            out[key] = CategoricalDistribution(value)
        elif SEARCHABLE[key] == "int":
            r: SearchRange = value
            out[key] = IntDistribution(int(r.low), int(r.high), log=r.log, step=int(r.step or 1))
        else:
            out[key] = FloatDistribution(value.low, value.high, log=value.log, step=value.step)
    return out


def recover(study) -> list[int]:
    """Trials a killed sweep left RUNNING: mark them failed and queue their parameters again (their trainings
    resume from their checkpoints: the trial's run key depends on its parameters only). Returns their numbers."""
    import optuna

    lost = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for t in lost:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params)
    return [t.number for t in lost]


def finished(study) -> int:
    """Trials that count towards ``sweep.trials``: completed or pruned."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(t.state in done for t in study.trials)


def earlier(study, params: dict):
    """A finished (complete or pruned) trial of the study with exactly these parameters, or None."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return next((t for t in study.trials if t.state in done and t.params == params), None)


def trial_key(run_key: str, params: dict) -> str:
    """The trial's pipeline run key: the sweep's key and a hash of the parameters (the same parameters
    continue the same training)."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{run_key}-t{digest}"


def pruning(study, trial, spec: PipelineSpec) -> dict:
    """What the training job needs to report to this trial and ask its pruner (``launch.pruning``)."""
    return {"storage": storage_url(), "study": study.study_name, "trial_id": trial._trial_id,
            "pruner": pruner_config(spec)}


class TrialStart(Protocol):
    """Starts the training of one trial and returns at once: ``start(trial_spec, trial_key, pruning)`` -> a future
    whose ``result()`` is the :class:`~prefixflow.services.trained.TrainOutcome` (or raises its failure)."""

    def __call__(self, spec: PipelineSpec, run_key: str, pruning: dict) -> Any: ...


def run_trials(spec: PipelineSpec, run_key: str, study, start: TrialStart) -> None:
    """Ask the study for trials, ``sweep.concurrent`` at a time, start each through ``start`` and tell the study
    how it ended, until ``sweep.trials`` are complete or pruned. A setting the sampler repeats gets the earlier
    trial's result without training; a setting the spec refuses (e.g. a batch size) is a failed trial; a training
    that fails after its retries is a failed trial and the sweep goes on."""
    import optuna

    state = optuna.trial.TrialState
    space = distributions(spec.sweep.space)
    while (done := finished(study)) < spec.sweep.trials:
        batch = [study.ask(space) for _ in range(min(spec.sweep.concurrent, spec.sweep.trials - done))]
        started = []
        for trial in batch:
            key = trial_key(run_key, trial.params)
            trial.set_user_attr("run_key", key)
            same = earlier(study, trial.params)
            if same is not None:
                _repeat(study, trial, same)
                continue
            try:
                trial_spec = spec.with_params(trial.params)
            except SpecError as err:
                trial.set_user_attr("error", str(err).splitlines()[-1].strip())
                study.tell(trial, state=state.FAIL)
                continue
            started.append((trial, start(trial_spec, key, pruning(study, trial, spec))))
        for trial, future in started:
            try:
                outcome = future.result()
            except Exception as err:  # the trial failed after its retries; the sweep goes on
                trial.set_user_attr("error", f"{type(err).__name__}: {str(err).splitlines()[0]}"[:500])
                study.tell(trial, state=state.FAIL)
                continue
            trial.set_user_attr("steps", outcome.steps)
            trial.set_user_attr("seconds", round(outcome.seconds, 1))
            if outcome.pruned:
                study.tell(trial, state=state.PRUNED)
            elif outcome.best_eval_loss is None:
                trial.set_user_attr("error", "no validation loss (the data has no validation split)")
                study.tell(trial, state=state.FAIL)
            else:
                study.tell(trial, outcome.best_eval_loss)


def _repeat(study, trial, same) -> None:
    """Tell ``trial`` the result of the earlier trial ``same`` with the same parameters."""
    import optuna

    trial.set_user_attr("steps", same.user_attrs.get("steps"))
    trial.set_user_attr("repeat_of", same.number)
    if same.state == optuna.trial.TrialState.COMPLETE:
        study.tell(trial, same.value)
        return
    last = max(same.intermediate_values, default=None)
    if last is not None:
        trial.report(same.intermediate_values[last], last)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)


def best_trial(trials: list[TrialRow]) -> TrialRow:
    """The complete trial with the lowest validation loss; RuntimeError saying why when none finished."""
    complete = [t for t in trials if t.state == "COMPLETE"]
    if not complete:
        raise RuntimeError(f"no trial of the sweep finished ({len(trials)} failed or pruned): "
                           + "; ".join(f"trial {t.number}: {t.error or t.state}" for t in trials[:5]))
    return min(complete, key=lambda t: t.value)


def rows(study) -> list[TrialRow]:
    out = []
    for t in study.trials:
        value = t.value if t.value is not None else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        a = t.user_attrs
        out.append(TrialRow(number=t.number, state=t.state.name, value=value, params=t.params, steps=a.get("steps"),
                            run_key=a.get("run_key"), seconds=a.get("seconds"), error=a.get("error")))
    return out


def summary_markdown(spec: PipelineSpec, trials: list[TrialRow], best: TrialRow, registered: str, plot: str | None,
                     link: str) -> str:
    keys = list(spec.sweep.space)
    lines = [f"# sweep {spec.client}/{spec.task}: best trial {best.number} ({registered})", "",
             f"{len(trials)} trials ({sum(t.state == 'COMPLETE' for t in trials)} complete, "
             f"{sum(t.state == 'PRUNED' for t in trials)} pruned, {sum(t.state == 'FAIL' for t in trials)} failed); "
             f"sampler {spec.sweep.sampler}, pruner {spec.sweep.pruner}; objective: best validation loss.", "",
             "| trial | state | validation loss | steps | " + " | ".join(keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for t in trials:
        mark = " **best**" if t.number == best.number else ""
        value = "-" if t.value is None else f"{t.value:.4f}"
        lines.append(f"| {t.number}{mark} | {t.state} | {value} | {t.steps or '-'} | "
                     + " | ".join(str(t.params.get(k, "-")) for k in keys) + " |")
    if plot:
        lines += ["", f"Plot of the metric against prefix length and learning rate: `{plot}` (also in MLflow)."]
    lines += ["", f"MLflow run: {link}"]
    return "\n".join(lines)


def plot(trials: list[TrialRow], out: Path) -> Path | None:
    """Validation loss against prefix length and against learning rate (a PNG), or None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [t for t in trials if t.value is not None]
    if not scored:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label, log in ((axes[0], "prefix.num_virtual_tokens", "prefix length (virtual tokens)", False),
                                (axes[1], "train.learning_rate", "learning rate", True)):
        for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
            pts = [(t.params[key], t.value) for t in scored if t.state == state and key in t.params]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, label=state.lower())
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        if log:
            ax.set_xscale("log")
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
