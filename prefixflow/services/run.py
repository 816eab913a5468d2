"""What a pipeline run carries from task to task, and what it returns: small pydantic models (Prefect persists and
caches them; they hold URIs and numbers, never models or tensors).

* :class:`RunContext`: the spec, the run key (names the run's folder, cache entries and MLflow run) and the MLflow
  run id; the train, evaluate and register tasks take it instead of the three as separate arguments.
* :class:`RunResult`: the result of ``prefix_pipeline``; :class:`SweepResult` extends it with the trials.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from prefixflow.services.evaluation import EvalReport
from prefixflow.services.preparation import PreparedData
from prefixflow.services.registration import Registration, Unchanged
from prefixflow.services.spec import PipelineSpec
from prefixflow.services.sweeps import TrialRow
from prefixflow.services.trained import TrainOutcome


class RunContext(BaseModel):
    """One pipeline run (or one sweep trial): ``run_key`` is the run's identity across retries and
    ``--run-key`` reruns; ``mlflow_run_id`` the MLflow run it logs to (None before it is opened)."""

    spec: PipelineSpec
    run_key: str
    mlflow_run_id: str | None = None


class RunResult(BaseModel):
    """``outcome``: ``registered`` (trained, evaluated, a version registered) or ``unchanged`` (the champion
    already is what this run would train: ``unchanged`` says which and why; nothing else ran). ``timings``:
    seconds of ``total`` and of each step that ran (``prepare``, ``train``, ``evaluate``), and ``orchestration``
    (the rest; negative when the results were reused from an earlier run of the run key)."""

    client: str
    task: str
    run_key: str
    outcome: Literal["registered", "unchanged"] = "registered"
    mlflow_run_id: str | None = None
    mlflow_link: str | None = None
    data: PreparedData
    trained: TrainOutcome | None = None
    report: EvalReport | None = None
    registration: Registration | None = None
    unchanged: Unchanged | None = None
    timings: dict[str, float]


class SweepResult(RunResult):
    """A sweep's result: the registered version is the best trial's (``best``), trained again for
    ``sweep.final_max_steps`` when set. ``recovered``: trials a killed earlier attempt left running (queued
    again)."""

    trials: list[TrialRow]
    best: TrialRow
    recovered: list[int]
