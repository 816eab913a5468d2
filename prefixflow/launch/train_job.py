"""The training job run inside every process that ``accelerate launch`` starts.

    python -m prefixflow.launch.train_job JOB.json

``JOB.json`` is a :class:`TrainJob`. Every rank loads the base model and the prepared data and runs
the same :class:`prefix_core.train.Trainer`; the main process prints one ``PREFIXFLOW_EVENT {json}``
line per trainer event (plus ``loaded`` after the model is loaded, and ``usage`` (launch.usage) and ``artifact``
at the end) and
writes the folded prefix artifact to ``output_dir`` (atomically). A user error prints one line
``PREFIXFLOW_ERROR <message>`` and exits with code 3 (retrying will not help); anything else
propagates (traceback, exit code 1). ``prefixflow/launch/command.py`` builds the command and reads the output.

Tests inject faults (a rank killed or hung after a step) through one seam, ``PREFIXFLOW_STEP_HOOK``
(:func:`step_hook`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from prefix_core.files import atomic_write
from prefix_core.train_pace import clock
from prefixflow import settings
from prefixflow.launch.protocol import ERROR_PREFIX, EVENT_PREFIX, PRUNED_EXIT, USER_ERROR_EXIT
from prefixflow.launch.usage import job_usage
from prefixflow.services.spec import STRATEGIES

# Deferred imports: prefix_core, torch and transformers are deferred to the job's steps: the job reports a bad job
# file or setting before it loads them.

log = logging.getLogger(__name__)


class UserError(Exception):
    """A problem with the job itself (bad settings, missing data): reported, never retried."""


@dataclass
class TrainJob:
    """Everything one training launch needs; written by the pipeline, read by every rank."""

    base_model: str
    data_dir: str
    template: str
    prefix: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    strategy: str = "single"
    checkpoint_dir: str = ""
    output_dir: str = ""
    manifest_fields: dict = field(default_factory=dict)
    pruning: dict | None = None  # a sweep trial: {"storage", "study", "trial_id", "pruner"} (launch.pruning)
    warm_start: str | None = None  # a prefix artifact folder to start from (services.warm_start), else a new prefix

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        if not self.output_dir:
            raise ValueError("output_dir is required: the folded prefix artifact is written there")

    def to_json(self, path: str | Path) -> Path:
        """Write the job atomically (a temporary file renamed into place)."""
        return atomic_write(path, json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def from_json(cls, path: str | Path) -> TrainJob:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"job file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"job file {path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"job file {path} must hold a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"job file {path} has unknown fields {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"job file {path}: {err}") from None


# --- output protocol -------------------------------------------------------------------------------
def print_event(event: dict) -> None:
    """One ``PREFIXFLOW_EVENT`` line, flushed (so the launcher sees progress as it happens)."""
    sys.stdout.write(EVENT_PREFIX + json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def print_error(message: str) -> None:
    line = " ".join(str(message).split())  # one line
    sys.stdout.write(ERROR_PREFIX + line + "\n")
    sys.stdout.flush()


# --- data ------------------------------------------------------------------------------------------
def read_examples(path: Path) -> list:
    """Examples from a prepared jsonl file (one object per line with "source" and "target")."""
    from prefix_core import Example

    if not path.is_file():
        raise UserError(f"prepared data file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(Example(str(row["source"]), str(row["target"])))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{path}:{n}: expected a JSON object with 'source' and 'target' ({err})") from None
    return out


def _configs(job: TrainJob):
    from prefix_core import PrefixConfig
    from prefix_core.data import check_template
    from prefix_core.train import TrainConfig

    check_template(job.template)
    for name, cls, values in (("prefix", PrefixConfig, job.prefix), ("train", TrainConfig, job.train)):
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserError(f"job.{name} has unknown fields {unknown}; known: {sorted(cls.__dataclass_fields__)}")
    return PrefixConfig(**job.prefix), TrainConfig(**job.train)


def step_hook():
    """The one test seam in the product: ``PREFIXFLOW_STEP_HOOK=module:factory`` names a factory that every
    rank calls once; what it returns (``hook(trainer)`` or None) runs after each optimizer step. The tests
    kill or hang a rank through it (tests/support/faults.py); nothing sets it in production."""
    target = settings.step_hook()
    if not target:
        return None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)()


# --- the job ---------------------------------------------------------------------------------------
STALE_BUILD_LOCK_S = 1800.0  # no op build takes this long; an older lock was left by a killed build


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove torch extension build locks older than ``max_age_s``. DeepSpeed JIT-builds ops (on CPU its
    shm comm op) under torch's extension root; a launch killed mid-build leaves ``NAME/lock`` behind and
    every later build of NAME waits on it forever. Returns the removed locks."""
    from torch.utils.cpp_extension import get_default_build_root

    # TORCH_EXTENSIONS_DIR/NAME/lock, else DEFAULT_ROOT/py311_cpu/NAME/lock (torch's own layout)
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
                log.warning("removed stale torch extension build lock %s (left by a killed build)", lock)
        except FileNotFoundError:  # another rank removed it first
            continue
    return removed


@contextlib.contextmanager
def _whole_model_loading(acc):
    """Load the base model whole on every rank, also under ZeRO-3. Accelerate registers its DeepSpeed
    config with transformers whatever ``zero3_init_flag`` says, and ``from_pretrained`` would then
    build the model already partitioned (zero.Init), before PrefixModel can probe its attention.
    The base is sharded when the Trainer prepares it instead."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    plugin.dschf = None
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def job_inputs(job: TrainJob) -> tuple:
    """The job's checked settings and data: ``(PrefixConfig, TrainConfig, train examples, validation examples)``.
    Raises :class:`UserError` for bad settings or data (before any model is loaded)."""
    try:
        data_dir = Path(job.data_dir)
        train = None
        if job.prefix.get("init") == "text" and not job.prefix.get("init_text"):  # the task's own targets
            from prefix_core.data import init_text_from_targets

            train = read_examples(data_dir / "train.jsonl")
            job.prefix["init_text"] = init_text_from_targets(train, int(job.prefix.get("num_virtual_tokens", 10)))
        prefix_cfg, train_cfg = _configs(job)  # the settings are checked before the data is read
        train = train if train is not None else read_examples(data_dir / "train.jsonl")
        val_path = data_dir / "validation.jsonl"
        validation = read_examples(val_path) if val_path.exists() else []
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    return prefix_cfg, train_cfg, train, validation


def encode_inputs(job: TrainJob, tokenizer, encoder_decoder: bool, train_cfg, train: list, validation: list):
    """The job's examples tokenized with its template: ``(train, validation)``."""
    from prefix_core.data import encode

    length = train_cfg.max_length
    train_enc = encode(tokenizer, train, job.template, length, encoder_decoder=encoder_decoder)
    val_enc = encode(tokenizer, validation, job.template, length, encoder_decoder=encoder_decoder) if validation \
        else []
    return train_enc, val_enc


def warm_started(job: TrainJob, model) -> None:
    """Load the prefix the job starts from into ``model`` (before the trainer is built); raises PrefixError when
    it cannot continue it (another base model, another prefix shape)."""
    if job.warm_start:
        from prefix_core import PrefixArtifact

        model.warm_start(PrefixArtifact.load(job.warm_start))


def warm_start_event(job: TrainJob, trainer) -> dict | None:
    """The validation loss of a warm-started prefix before any update (every rank evaluates; None when the job
    is not warm-started, has no validation set or resumes from a checkpoint)."""
    from prefix_core.checkpoint import complete_checkpoints

    checkpoints = Path(job.checkpoint_dir) if job.checkpoint_dir else None
    if not job.warm_start or not trainer.eval_set or (
            checkpoints is not None and checkpoints.exists() and complete_checkpoints(checkpoints)):
        return None
    return {"event": "warm_start", "eval_loss": trainer.evaluate(), "from": job.manifest_fields.get("warm_start")}


def loaded_event(job: TrainJob, acc, model, train_enc: list, val_enc: list) -> dict:
    return {"event": "loaded", "base_model": job.base_model, "strategy": job.strategy,
            "processes": acc.num_processes, "device": str(acc.device),
            "trainable_parameters": model.trainable_parameters(), "train_examples": len(train_enc),
            "eval_examples": len(val_enc), "truncated": sum(e.truncated for e in train_enc)}


def write_artifact(job: TrainJob, model, result, train_cfg, processes: int) -> Path:
    """Fold the trained prefix into its artifact in ``job.output_dir`` (atomically); returns its path."""
    training = {"strategy": job.strategy, "processes": processes, "config": train_cfg.to_dict(),
                "steps": result.steps, "stopped_early": result.stopped_early,
                "best_eval_loss": result.best_eval_loss, "final_train_loss": result.final_train_loss,
                "resumed_from": result.resumed_from, "train_tokens": result.train_tokens,
                "precision": result.precision}
    extra = dict(job.manifest_fields)
    extra["training"] = {**extra.get("training", {}), **training}
    extra.setdefault("prompt_template", job.template)
    return model.export(**extra).save(job.output_dir)


def run_job(job: TrainJob) -> Path | None:
    """Train and export; returns the artifact path on the main process (None on the others)."""
    from prefix_core import PrefixModel, load_base_model
    from prefix_core.train import Trainer, make_accelerator

    started_at = clock()
    # Validation first: a user error here is raised on every rank before any collective.
    prefix_cfg, train_cfg, train, validation = job_inputs(job)
    if job.strategy.startswith("deepspeed"):
        clear_stale_build_locks()
    acc = make_accelerator()
    main = acc.is_main_process
    emit = print_event if main else (lambda event: None)
    try:
        with _whole_model_loading(acc):
            base, tokenizer = load_base_model(job.base_model, device=acc.device)
        model = PrefixModel(base, prefix_cfg, tokenizer=tokenizer)
        warm_started(job, model)
        train_enc, val_enc = encode_inputs(job, tokenizer, bool(base.config.is_encoder_decoder), train_cfg, train,
                                           validation)
        emit(loaded_event(job, acc, model, train_enc, val_enc))
        trainer = Trainer(model, tokenizer, train_enc, train_cfg, val_enc, job.checkpoint_dir or None, [emit], acc)
    except ValueError as err:  # config validation (batch sizes, template, init text ...)
        raise UserError(str(err)) from err
    if (event := warm_start_event(job, trainer)) is not None:
        emit(event)
    if job.pruning:
        from prefixflow.launch.pruning import pruning_hook

        trainer.step_hooks.append(pruning_hook(job.pruning, main))
    hook = step_hook()
    if hook is not None:
        trainer.step_hooks.append(hook)
    from prefixflow.launch.pruning import Pruned

    try:
        result = trainer.run()  # ends with the prefix consolidated on every rank
    except Pruned:  # every rank is pruned at the same step: the trial's cost is reported too
        emit(job_usage(acc, started_at, trainer.pace.tokens))
        raise
    path = None
    if main:  # the launcher counts the work done from here, whatever happens in the teardown
        path = write_artifact(job, model, result, train_cfg, acc.num_processes)
        emit({"event": "artifact", "path": str(path)})
    usage = job_usage(acc, started_at, result.train_tokens)  # every rank: the job's last collective
    emit(usage)
    return path  # no acc.end_training(): it destroys the process group (see main)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if len(args) != 1:
        print_error("usage: python -m prefixflow.launch.train_job JOB.json")
        return USER_ERROR_EXIT
    from prefix_core import PrefixError

    try:
        job = TrainJob.from_json(args[0])
    except ValueError as err:
        print_error(str(err))
        return USER_ERROR_EXIT
    from prefixflow.launch.pruning import Pruned

    try:
        run_job(job)
    except Pruned as pruned:  # a sweep trial stopped by its pruner: every rank exits the same way
        print_event({"event": "pruned", "step": pruned.step, "eval_loss": pruned.loss})
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(PRUNED_EXIT)
    except (UserError, PrefixError) as err:
        # Only validation errors and prefix_core's own errors: a ValueError raised while training is
        # a bug or a crash and propagates (traceback, exit 1) like any other exception.
        print_error(str(err))
        sys.stderr.flush()
        os._exit(USER_ERROR_EXIT)  # no collective shutdown: the other ranks may be elsewhere
    sys.stdout.flush()
    sys.stderr.flush()
    # No collective teardown: destroy_process_group (also called by Accelerator.end_training) can hang: with
    # gloo, a rank destroying after its peer exited waits for ever (seen on CI under load; pytorch/pytorch#75097),
    # and DeepSpeed (ZeRO-3) can abort in interpreter teardown. The usage gather was the last collective, so
    # every rank is past it and the sockets close with the process.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
