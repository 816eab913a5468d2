"""Sweeps on a tiny model: a pruned trial really stops early, the registered version is the best trial's (tagged
with the sweep), each trial is an MLflow child run, and a killed sweep continues without rerunning finished
trials."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from prefixflow.services.spec import SpecError, parse_spec
from support.harness import wait_until
from support.pipeline import marked, patched_environ, save_tiny_model, spec_dict, write_task

SPACE = {"train.learning_rate": [5e-2, 1e-2, 1e-6], "prefix.num_virtual_tokens": [2, 4]}  # the spec: 1e-2, 4


def sweep_dict(model: Path, data: Path, trials: int = 4, **sweep) -> dict:
    d = spec_dict(model, data)
    d["train"].update(max_steps=12, eval_every=2, checkpoint_every=4)
    d["sweep"] = {"trials": trials, "sampler": "random", "pruner": "median", "startup_trials": 1, "seed": 0,
                  "space": SPACE, **sweep}
    return d


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("sweep")
    with patched_environ({"PREFIXFLOW_HOME": str(root / "state")}, unset=("MLFLOW_TRACKING_URI",)), \
            prefect_test_harness(server_startup_timeout=120):
        yield {"root": root, "model": save_tiny_model(root / "tiny-llama"),
               "data": write_task(root / "rev.jsonl", n=120)}


def test_a_sweep_prunes_and_registers_its_best_trial(env):
    from prefixflow.flows.sweep import prefix_sweep
    from prefixflow.services import tracking

    spec = parse_spec(sweep_dict(env["model"], env["data"]))
    result = prefix_sweep(spec, run_key="sweep-one")
    states = [t.state for t in result.trials]
    assert result.trials[0].params == {"train.learning_rate": 1e-2, "prefix.num_virtual_tokens": 4}  # the spec's
    assert len(result.trials) == 4 and "COMPLETE" in states and "PRUNED" in states
    for t in result.trials:
        if t.state == "PRUNED":
            assert t.steps is not None and t.steps < 12  # stopped at a validation, long before max_steps
    pruned_keys = {t.run_key for t in result.trials if t.state == "PRUNED"}
    state = env["root"] / "state" / "runs" / "acme" / "rev"
    for key in pruned_keys:  # no artifact, and no checkpoint beyond the step it was pruned at
        assert not (state / key / "prefix" / "manifest.json").exists()
    best = min((t for t in result.trials if t.state == "COMPLETE"), key=lambda t: t.value)
    assert result.best.number == best.number
    c = tracking.client()
    mv = c.get_model_version(result.registration.name, result.registration.version)
    assert mv.tags["sweep"] == "sweep-one" and mv.tags["sweep.trial"] == str(best.number)
    assert mv.tags["num_virtual_tokens"] == str(best.params["prefix.num_virtual_tokens"])
    assert float(mv.tags["sweep.param.train.learning_rate"]) == best.params["train.learning_rate"]
    # every trained trial is a child run of the sweep's run; the summary (table + plot) is in the sweep's run
    children = c.search_runs([c.get_run(result.mlflow_run_id).info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{result.mlflow_run_id}'")
    assert len(children) == len({t.run_key for t in result.trials if t.steps is not None})
    names = {Path(f.path).name for f in c.list_artifacts(result.mlflow_run_id, "sweep")}
    assert {"summary.md", "sweep.png", "trials.json"} <= names


def test_sweep_spec_is_checked():
    d = {"client": "a", "task": "b", "data": {"source": "x.csv"}, "sweep": {"space": {"train.seed": [1, 2]}}}
    with pytest.raises(SpecError, match="cannot be searched"):
        parse_spec(d)
    d["sweep"] = {"space": {"train.learning_rate": {"low": 1e-2, "high": 1e-4}}}
    with pytest.raises(SpecError, match="must be >= low"):
        parse_spec(d)
    d["sweep"] = {"space": {"prefix.init": {"low": 1, "high": 2}}}
    with pytest.raises(SpecError, match="list of choices"):
        parse_spec(d)
    d["sweep"] = {"sampler": "grid", "space": {"train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}}
    with pytest.raises(SpecError, match="grid needs a list"):
        parse_spec(d)
    ok = parse_spec({**d, "sweep": {"space": {"prefix.projection_hidden": [None, 64],
                                               "train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}}})
    assert ok.with_params({"prefix.projection_hidden": None}).prefix.projection_hidden is None
    with pytest.raises(SpecError, match="not a valid spec"):
        ok.with_params({"train.batch_size": 0})


def _trials(study_db: Path, name: str) -> list:
    """The study's trials; none before the sweep has created the database and the study in it."""
    import optuna

    if not study_db.exists():
        return []
    try:  # opened read-only until the sweep has finished making the schema: opening the storage earlier would
        # make it too, and the two would race on alembic_version (the sweep failed so once, under load)
        with contextlib.closing(sqlite3.connect(f"file:{study_db}?mode=ro", uri=True)) as con:
            if not con.execute("SELECT count(*) FROM alembic_version").fetchone()[0]:
                return []
    except sqlite3.Error:
        return []
    try:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{study_db}").trials
    except KeyError:  # the database is there, the study not yet
        return []


@pytest.mark.slow
def test_a_killed_sweep_continues_without_rerunning_finished_trials(tmp_path):
    """`prefixflow sweep` as a subprocess, killed (SIGKILL, with its training) once a trial has finished;
    the same command with the run key finishes the sweep, training only the trials not finished before."""
    model, data = save_tiny_model(tmp_path / "model"), write_task(tmp_path / "rev.jsonl", n=120)
    d = sweep_dict(model, data, trials=3, pruner="none",
                   space={"train.learning_rate": [5e-2, 2e-2, 1e-2]}, sampler="grid")
    d["train"]["max_steps"] = 30
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(d))
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")}
    env.update(PREFIXFLOW_HOME=str(tmp_path / "state"), PREFIXFLOW_TEST_MARK=mark, COLUMNS="200")
    exe = str(Path(sys.executable).with_name("prefixflow"))
    key = "killed-sweep"
    db, name = tmp_path / "state" / "sweeps" / "optuna.db", f"acme-rev-{key}"
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([exe, "sweep", str(spec), "--run-key", key], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def one_done_one_running() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        states = {t.state.name for t in _trials(db, name)}
        return {"COMPLETE", "RUNNING"} <= states

    try:
        wait_until(one_done_one_running, 600, 0.5, message=lambda: log.read_text()[-3000:])
    finally:  # a crash: the flow process and every training process it started die at once
        for pid in marked(mark):
            os.kill(pid, signal.SIGKILL)
        proc.wait(30)
    finished_before = {t.params["train.learning_rate"] for t in _trials(db, name) if t.state.name == "COMPLETE"}
    assert finished_before and len(finished_before) < 3

    again = subprocess.run([exe, "sweep", str(spec), "--run-key", key], env=env, capture_output=True, text=True,
                           timeout=900)
    out = " ".join((again.stdout + again.stderr).split())
    assert again.returncode == 0, out[-3000:]
    assert "continued the sweep: trials" in out and "registered acme-rev v1" in out
    launched = out.count("launching single training")
    assert launched == 3 - len(finished_before)  # finished trials were not trained again
    complete = [t for t in _trials(db, name) if t.state.name == "COMPLETE"]
    assert {t.params["train.learning_rate"] for t in complete} == {5e-2, 2e-2, 1e-2}
