"""What a finished training hands to evaluation and registration (the ``train_prefix`` task's result)."""

from __future__ import annotations

from pydantic import BaseModel


class TrainOutcome(BaseModel):
    artifact_uri: str
    run_dir: str
    steps: int
    resumed_from: int | None
    best_eval_loss: float | None
    final_train_loss: float | None
    history_uri: str | None
    precision: dict | None = None  # prefix_core.precision.Precision.to_dict() of the training job
    seconds: float
    launched_at: float  # when the launch began (after waiting for a training slot and GPUs)
    finished_at: float  # when the launch ended
    pruned: bool = False  # a sweep trial stopped early by its pruner (no artifact)
    warm_start: dict | None = None  # what prefix.init: champion became (services.warm_start.WarmStart) + step-0 loss
    usage: dict | None = None  # the job's usage event (launch.usage), kept with the prefix (outcome.json)
