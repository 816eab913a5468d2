"""One training of a pipeline run: run prefix_core's training as an ``accelerate launch`` subprocess (one
process by default; DDP/DeepSpeed by the spec's strategy; ``srun`` over the nodes with ``launcher: slurm``),
turn its events into log lines and MLflow metrics (and hand them to listeners, e.g. the Prefect task's
progress artifact), and return the folded prefix artifact's URI. No Prefect here: the ``train_prefix`` task
adds retries, the global training limit and the progress artifact.

The run's folder ``$PREFIXFLOW_HOME/runs/CLIENT/TASK/RUN_KEY/`` holds ``job.json``, ``train.log``,
``checkpoints/``, ``prefix/`` and ``outcome.json`` (the landed job's end and usage events). A retried task
relaunches every rank and the job resumes from the newest complete checkpoint; a finished prefix is reused as it
is, and a task retried after it landed returns the outcome recorded then (steps, resumed_from, usage).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path

from prefix_core import ArtifactError, PrefixArtifact
from prefix_core.checkpoint import complete_checkpoints
from prefix_core.files import atomic_write
from prefixflow.launch import slurm
from prefixflow.launch.checkpoint_mirror import CheckpointMirror, remote_checkpoints_uri
from prefixflow.launch.command import build_launch
from prefixflow.launch.gang import RunLock, run_launch
from prefixflow.launch.gpu_slots import gpu_slots
from prefixflow.launch.packing import PackRequest, active_packer, pack_key
from prefixflow.launch.train_job import TrainJob
from prefixflow.services import tracking
from prefixflow.services.errors import TrainingError
from prefixflow.services.preparation import PreparedData
from prefixflow.services.spec import PipelineSpec
from prefixflow.services.storage import run_dir
from prefixflow.services.trained import TrainOutcome
from prefixflow.services.usage import usage_metrics, usage_tags
from prefixflow.services.warm_start import WarmStart, log_chain, plan

log = logging.getLogger(__name__)
_WATCHERS: ContextVar[tuple[Callable[[PipelineSpec, dict], None], ...]] = ContextVar("prefixflow_training_watchers",
                                                                                   default=())


@contextmanager
def watching(watcher: Callable[[PipelineSpec, dict], None]) -> Iterator[None]:
    """Within the block, ``watcher(spec, event)`` gets every event of every training started in this context
    (Prefect copies the context into the threads that run tasks), e.g. the CLI's progress bar."""
    token = _WATCHERS.set((*_WATCHERS.get(), watcher))
    try:
        yield
    finally:
        _WATCHERS.reset(token)


def make_job(spec: PipelineSpec, data: PreparedData, run_key: str, folder: Path, pruning: dict | None = None,
             warm: WarmStart | None = None):
    """The job file of this training; ``warm``: what ``prefix.init: champion`` became (warm_start.plan): the job
    starts from its prefix when it is a warm start, from a random one when it is not."""
    t = spec.train
    config = t.train_config(spec.data.max_length)
    prefix = {**spec.prefix.model_dump(exclude={"init_from"}), "seed": t.seed}
    if prefix["init"] == "champion":
        prefix["init"] = "random"  # overwritten by the version's prefix on a warm start
    pipeline = {"client": spec.client, "task": spec.task, "run_key": run_key, "spec_hash": spec.spec_hash(),
                "data_fingerprint": data.fingerprint}
    fields = {"pipeline": pipeline}
    if warm is not None:
        fields["warm_start"] = warm.model_dump(exclude={"artifact_dir"})
    return TrainJob(base_model=spec.base_model, data_dir=data.uri, template=spec.data.template, prefix=prefix,
                    train=config.to_dict(), strategy=t.strategy, checkpoint_dir=str(folder / "checkpoints"),
                    output_dir=str(folder / "prefix"), manifest_fields=fields, pruning=pruning,
                    warm_start=warm.artifact_dir if warm is not None else None)


def _finished(out: Path) -> bool:
    try:
        PrefixArtifact.load(out)
        return True
    except ArtifactError:
        return False


OUTCOME_FILE = "outcome.json"


def _record(path: Path, progress: Progress, launched: float, landed: float) -> None:
    """Keep what the landed job said about itself, for a task retried after it landed."""
    atomic_write(path, json.dumps({"end": progress.end, "usage": progress.usage, "warm_start": progress.warm,
                                   "launched_at": launched, "finished_at": landed}))


def _recalled(path: Path, progress: Progress, default: tuple[float, float]) -> tuple[float, float]:
    """Restore the recorded end and usage events into ``progress``; returns (launched_at, finished_at) of the
    training that landed (``default`` for a prefix trained before outcomes were recorded)."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return default
    progress.end, progress.usage, progress.warm = recorded.get("end") or {}, recorded.get("usage"), \
        recorded.get("warm_start")
    return recorded.get("launched_at", default[0]), recorded.get("finished_at", default[1])


def _precision(out: Path) -> dict | None:
    """The precision the job trained in, as recorded in the artifact's manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest.get("training", {}).get("precision")


def _history(checkpoints: Path) -> list[dict]:
    done = complete_checkpoints(checkpoints) if checkpoints.exists() else []  # newest first
    return json.loads((done[0] / "state.json").read_text())["history"] if done else []


class Progress:
    """Turns the job's events into log lines and MLflow metrics, and hands each to ``listeners``."""

    def __init__(self, spec: PipelineSpec, mlflow_run_id: str | None, logger,
                 listeners: tuple[Callable[[dict], None], ...] = ()) -> None:
        self.spec, self.run_id, self.logger = spec, mlflow_run_id, logger
        self.end: dict = {}
        self.pruned: dict | None = None  # the job's "pruned" event (a sweep trial stopped by its pruner)
        self.usage: dict | None = None  # the job's "usage" event (launch.usage): what this training cost
        self.warm: dict | None = None  # what prefix.init: champion became, and the step-0 validation loss
        self.listeners = listeners  # called with every event (a progress artifact, the checkpoint mirror)

    def __call__(self, event: dict) -> None:
        for watcher in _WATCHERS.get():
            watcher(self.spec, event)
        for listener in self.listeners:
            listener(event)
        kind = event.get("event")
        if kind == "step":
            self.logger.info("step %d/%d: loss %.4f, %.0f tokens/s, eta %.0f s", event["step"], event["max_steps"],
                             event["loss"], event["tokens_per_s"], event["eta_s"])
            self._metrics({"train_loss": event["loss"], "learning_rate": event["lr"],
                           "tokens_per_s": event["tokens_per_s"], "grad_norm": event.get("grad_norm")}, event["step"])
        elif kind == "eval":
            self.logger.info("step %d: validation loss %.4f (best %.4f) on %s examples in %.1f s", event["step"],
                             event["eval_loss"], event["best_eval_loss"], event.get("examples", "?"),
                             event.get("seconds", 0.0))
            self._metrics({"eval_loss": event["eval_loss"], "eval_seconds": event.get("seconds")}, event["step"])
        elif kind == "precision":
            if event.get("warning"):
                self.logger.warning(event["warning"])
            self.logger.info("precision: %s", event["reason"])
        elif kind == "warm_start":
            self.warm = {**(self.warm or {}), "step0_eval_loss": event["eval_loss"]}
            self.logger.info("warm start: validation loss %.4f at step 0, before any update", event["eval_loss"])
            self._metrics({"eval_loss": event["eval_loss"]}, 0)
        elif kind == "resume":
            self.logger.warning("resumed from checkpoint %s (step %d)", event["path"], event["step"])
        elif kind == "loaded":
            self.logger.info("job started: %s", {k: v for k, v in event.items() if k != "event"})
        elif kind == "pruned":
            self.pruned = event
            self.logger.info("trial pruned at step %d: validation loss %.4f is not promising", event["step"],
                             event["eval_loss"])
        elif kind == "usage":
            self.usage = {k: v for k, v in event.items() if k not in ("event", "member")}
            self.logger.info("cost: %.1f s wall%s, %.1f CPU-s, %.1f GPU-s, %d tokens, peak %.0f MiB on %s",
                             event["wall_s"], f" (share of a pack of {event['pack_members']})"
                             if event.get("pack_members", 1) > 1 else "", event["cpu_s"], event["gpu_s"],
                             event["tokens"], event.get("peak_device_mb") or event["peak_host_mb"],
                             event.get("device_name", event.get("device")))
            self._metrics(usage_metrics(self.usage), 0)
            if self.run_id:
                try:
                    tracking.set_tags(self.run_id, usage_tags(self.usage))
                except Exception as err:  # best effort, like the metrics
                    self.logger.warning("could not tag the MLflow run with its device: %s", _gist(err))
        elif kind == "end":
            self.end = event
            if event.get("stopped_early"):
                self.logger.info("stopped early at step %d of %d: no validation improvement of more than %g in %d "
                                 "validations (best validation loss %.4f, its prefix is kept)", event["steps"],
                                 self.spec.train.max_steps, self.spec.train.early_stopping_min_delta,
                                 self.spec.train.early_stopping_patience, event["best_eval_loss"])

    def _metrics(self, values: dict, step: int) -> None:
        if self.run_id:
            try:
                tracking.log_metrics(self.run_id, values, step)
            except Exception as err:  # metrics are best effort; training goes on
                self.logger.warning("could not log metrics to MLflow: %s", _gist(err))


def _devices(spec: PipelineSpec):
    """GPU slots on this machine for a local launch; under Slurm the scheduler allocates devices."""

    return gpu_slots(spec.train.processes_per_machine) if spec.train.launcher == "local" else nullcontext({})


def _build(spec: PipelineSpec, job_file: Path, run_key: str, logger):
    """The launch command: ``accelerate launch`` here, or ``srun`` over the nodes (after cancelling any job
    of an earlier try of this run that is still in Slurm's queue)."""

    if spec.train.launcher == "local":
        return build_launch(spec.train, job_file)
    try:
        slurm.check_commands()
    except slurm.SlurmUnavailable as err:
        raise TrainingError(str(err)) from None
    name = slurm.job_name(spec.client, spec.task, run_key)
    for leftover in slurm.cancel_leftovers(name):
        logger.warning("cancelled Slurm job %s (%s) left by an earlier try of this run", name, leftover)
    return slurm.build_srun(spec.train, job_file, name)


def _launch(spec: PipelineSpec, data: PreparedData, run_key: str, folder: Path, progress: Progress,
            logger, slot: Callable[[], AbstractContextManager] = nullcontext,
            pruning: dict | None = None) -> tuple[float, float]:
    """Write the job, restore/mirror checkpoints, wait for a training slot and GPUs, run the launch.
    Returns (launched_at, finished_at); raises TrainingError (bad input) or RuntimeError (retry)."""

    if spec.train.machines > 1 and spec.train.launcher == "local":
        raise TrainingError(
            f"train.machines is {spec.train.machines} but train.launcher is local: a local launch cannot start "
            "other machines. Set train.launcher: slurm (the flow runs srun over the nodes), launch the Kubernetes "
            "Indexed Job (infra/k8s/multinode-train.yaml, docs/scale-out.md), or set train.machines: 1")
    with RunLock(folder / ".train.lock") as lock:  # before anything in the run's folder is written
        return _launch_locked(spec, data, run_key, folder, progress, logger, slot, pruning, lock)


def _launch_locked(spec: PipelineSpec, data: PreparedData, run_key: str, folder: Path, progress: Progress,
                   logger, slot: Callable[[], AbstractContextManager], pruning: dict | None,
                   lock) -> tuple[float, float]:
    warm = plan(spec, data, folder, logger)
    if warm is not None:
        progress.warm = warm.model_dump(exclude={"artifact_dir"})
        if warm.artifact_dir and progress.run_id:
            log_chain(progress.run_id, warm)
    job = make_job(spec, data, run_key, folder, pruning, warm)
    job.to_json(folder / "job.json")
    remote = remote_checkpoints_uri(spec.client, spec.task, run_key)
    mirror = CheckpointMirror(folder / "checkpoints", remote, job.train["keep_checkpoints"]) if remote else None
    if mirror is not None:
        restored = mirror.restore()
        if restored is not None:
            logger.info("checkpoint %s restored from %s", restored.name, remote)
    on_event = progress if mirror is None else lambda event: (progress(event), mirror.on_event(event))
    packer, kind = active_packer(), pack_key(spec, pruning)
    if packer is not None and kind is not None:
        logger.info("training in a pack: one process for the trainings of %s that are due now", spec.base_model)
        end = packer.train(PackRequest(kind, f"{spec.client}/{spec.task}/{run_key}", folder / "job.json", lock,
                                       spec.train, on_event, slot, folder / "train.log"))
        launched, landed, reason, refused = end.launched_at, end.finished_at, end.reason, end.error
        failure = f"training failed in its pack: {end.error}"
    else:
        with slot(), _devices(spec) as device_env:
            launch = _build(spec, folder / "job.json", run_key, logger)
            launch.env.update(device_env)
            launched = time.time()
            logger.info("launching %s training: %s", spec.train.strategy, " ".join(launch.argv))
            local = spec.train.launcher == "local"
            hang_s = spec.train.hang_timeout_s if local else slurm.flow_hang_timeout(spec.train)
            result = run_launch(launch, on_event, log_file=folder / "train.log", hang_timeout_s=hang_s, lock=lock)
            landed = time.time()
        reason, refused = result.reason, result.error
        if reason not in ("ok", "user_error") and result.done and _finished(folder / "prefix"):
            logger.warning("training wrote its prefix, then %s: the prefix is complete and kept", result.error)
            reason = "ok"
        tail = "\n".join(result.tail[-15:])
        failure = (f"training {result.reason} (exit code {result.returncode}): {result.error}; "
                   f"full log: {folder / 'train.log'}\n{tail}")
    for problem in mirror.close() if mirror is not None else []:
        logger.warning("checkpoint not mirrored to %s: %s", remote, problem)
    if reason == "user_error":
        raise TrainingError(refused or "training refused its input")
    if progress.pruned is not None:  # stopped by its sweep's pruner: an outcome, not a failure
        return launched, landed
    if reason != "ok":
        raise RuntimeError(failure)
    return launched, landed


def train(spec: PipelineSpec, data: PreparedData, run_key: str, mlflow_run_id: str | None = None,
          logger: logging.Logger | logging.LoggerAdapter = log, *,
          slot: Callable[[], AbstractContextManager] = nullcontext,
          listeners: tuple[Callable[[dict], None], ...] = (), pruning: dict | None = None) -> TrainOutcome:
    """Launch (or resume) the training of pipeline run ``run_key`` and wait for it. ``slot()`` is held
    while the job runs (a concurrency limit); ``listeners`` get every job event. ``pruning``: the sweep trial
    this training is (``launch.pruning``); a pruned trial returns an outcome with ``pruned`` set and no
    artifact."""
    folder = run_dir(spec.client, spec.task, run_key)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "prefix"
    started = launched = landed = time.time()
    progress = Progress(spec, mlflow_run_id, logger, listeners)
    if _finished(out):
        logger.info("prefix of run %s already trained: %s", run_key, out)
        launched, landed = _recalled(folder / OUTCOME_FILE, progress, (launched, landed))
    else:
        launched, landed = _launch(spec, data, run_key, folder, progress, logger, slot, pruning)
        if progress.pruned is None:
            _record(folder / OUTCOME_FILE, progress, launched, landed)
    history = _history(folder / "checkpoints")
    (folder / "history.json").write_text(json.dumps(history))
    if progress.pruned is not None:
        evals = [h["eval_loss"] for h in history if "eval_loss" in h] + [progress.pruned["eval_loss"]]
        return TrainOutcome(artifact_uri="", run_dir=str(folder), steps=progress.pruned["step"], resumed_from=None,
                            best_eval_loss=min(evals), final_train_loss=None, history_uri=str(folder / "history.json"),
                            seconds=time.time() - started, launched_at=launched, finished_at=landed, pruned=True,
                            usage=progress.usage)
    precision = _precision(out)
    if mlflow_run_id and precision:
        tracking.log_params(mlflow_run_id, {"train.precision_used": precision["mode"],
                                            "train.precision_reason": precision["reason"]}, logger)
    end = progress.end
    steps = [h for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return TrainOutcome(
        artifact_uri=str(out), run_dir=str(folder), steps=end.get("steps", steps[-1]["step"] if steps else 0),
        resumed_from=end.get("resumed_from"), best_eval_loss=min(evals) if evals else None,
        final_train_loss=steps[-1]["loss"] if steps else None, history_uri=str(folder / "history.json"),
        precision=precision, usage=progress.usage, warm_start=progress.warm,
        seconds=time.time() - started, launched_at=launched, finished_at=landed)


def _gist(err: Exception) -> str:
    """The line of a (multi-line, SQL-laden) exception text that says what went wrong."""
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return next((line for line in lines if line.startswith("(sqlite3.") or "Error" in line), lines[0])[:300]
