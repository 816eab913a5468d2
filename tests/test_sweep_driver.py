"""The sweep's Optuna driver (services.sweeps.run_trials) without Prefect: trainings are fakes that answer at once,
so each rule of the ask/tell loop is checked on its own: completed, pruned, failed and refused trials, a repeated
setting that is not trained again, and the number of trials."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from prefixflow.services import sweeps
from prefixflow.services.spec import parse_spec
from support.pipeline import spec_dict


def _spec(tmp_path, space: dict, trials: int, sampler: str = "grid", concurrent: int = 1):
    d = spec_dict(tmp_path / "model", tmp_path / "data.jsonl")
    d["train"].update(max_steps=12, eval_every=2)
    d["sweep"] = {"trials": trials, "sampler": sampler, "pruner": "none", "seed": 0, "space": space,
                  "concurrent": concurrent, "start_with_spec": False}
    return parse_spec(d)


@pytest.fixture
def study_for(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXFLOW_SWEEP_STORAGE", f"sqlite:///{tmp_path / 'optuna.db'}")
    return lambda spec, key="k": sweeps.open_study(spec, key)


def _done(value):
    future = Future()
    if isinstance(value, Exception):
        future.set_exception(value)
    else:
        future.set_result(value)
    return future


def _outcome(loss: float | None, steps: int = 12, pruned: bool = False):
    return SimpleNamespace(steps=steps, seconds=1.0, pruned=pruned, best_eval_loss=loss)


def test_each_setting_is_trained_once_and_told_its_loss(tmp_path, study_for):
    spec = _spec(tmp_path, {"train.learning_rate": [0.1, 0.01, 0.001]}, trials=3)
    study, calls = study_for(spec), []

    def start(trial_spec, key, pruning):
        calls.append((trial_spec.train.learning_rate, key))
        assert pruning["study"] == study.study_name and key.startswith("k-t")
        return _done(_outcome(loss=trial_spec.train.learning_rate * 10))

    sweeps.run_trials(spec, "k", study, start)
    assert sorted(lr for lr, _ in calls) == [0.001, 0.01, 0.1] and len({k for _, k in calls}) == 3
    rows = sweeps.rows(study)
    assert {(r.params["train.learning_rate"], r.value, r.state) for r in rows} == {
        (0.1, 1.0, "COMPLETE"), (0.01, 0.1, "COMPLETE"), (0.001, 0.01, "COMPLETE")}
    assert sweeps.best_trial(rows).params == {"train.learning_rate": 0.001}


def test_pruned_failed_and_lossless_trials(tmp_path, study_for):
    spec = _spec(tmp_path, {"train.learning_rate": [0.1, 0.01, 0.001]}, trials=3)
    study = study_for(spec)
    answers = {0.1: _outcome(loss=None, steps=4, pruned=True), 0.01: RuntimeError("rank 0 died\nmore"),
               0.001: _outcome(loss=None)}
    sweeps.run_trials(spec, "k", study, lambda s, k, p: _done(answers[s.train.learning_rate]))
    rows = {r.params["train.learning_rate"]: r for r in sweeps.rows(study)}
    assert rows[0.1].state == "PRUNED" and rows[0.1].steps == 4
    assert rows[0.01].state == "FAIL" and rows[0.01].error == "RuntimeError: rank 0 died"
    assert rows[0.001].state == "FAIL" and "no validation loss" in rows[0.001].error
    # only the pruned trial counts as finished: the driver kept asking until `trials` finished or pruned
    assert sweeps.finished(study) >= 1
    with pytest.raises(RuntimeError, match="no trial of the sweep finished"):
        sweeps.best_trial(list(rows.values()))


def test_a_repeated_setting_is_not_trained_again(tmp_path, study_for):
    spec = _spec(tmp_path, {"train.learning_rate": [0.1]}, trials=3, sampler="random")
    study, calls = study_for(spec), []

    def start(trial_spec, key, pruning):
        calls.append(key)
        return _done(_outcome(loss=0.5))

    sweeps.run_trials(spec, "k", study, start)
    rows = sweeps.rows(study)
    assert len(calls) == 1 and len(rows) == 3 and all(r.value == 0.5 and r.state == "COMPLETE" for r in rows)
    assert [t.user_attrs.get("repeat_of") for t in study.trials] == [None, 0, 0]


def test_a_setting_the_spec_refuses_is_a_failed_trial(tmp_path, study_for):
    spec = _spec(tmp_path, {"prefix.num_virtual_tokens": [4, 0]}, trials=2)  # 0 virtual tokens: refused
    study = study_for(spec)
    sweeps.run_trials(spec, "k", study, lambda s, k, p: _done(_outcome(loss=1.0)))
    rows = {r.params["prefix.num_virtual_tokens"]: r for r in sweeps.rows(study)}
    assert rows[4].state == "COMPLETE" and rows[0].state == "FAIL" and "greater than or equal to 1" in rows[0].error
