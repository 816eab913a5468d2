"""The packed training job: several pipeline runs' trainings in one process, on one base model loaded once.

    python -m prefixflow.launch.pack_job PACK.json

``PACK.json`` is a :class:`PackJob`: member name -> that member's own job file (a
:class:`~prefixflow.launch.train_job.TrainJob`, written by its pipeline run exactly as for a training alone),
and the rows per shared forward. ``accelerate launch`` starts it as one process (strategy ``single``). Members
train as in :mod:`prefix_core.packed`, each with its own checkpoints (so each resumes from its own), and each
member's artifact is written to its own output folder as soon as it ends, while the others train on.

Output: the ``PREFIXFLOW_EVENT`` protocol of a training alone, every event with a ``"member"`` field, plus a
``failed`` event for a member that fails (``user_error``: its settings, data or a diverged loss; retrying will
not help); the others go on. Each member trained gets a ``usage`` event (launch.usage) with its share of the
pack's time, before its ``artifact`` or ``failed`` event. The job exits 0 when it ran to its end, failed members
included (their events say so). A crash exits non-zero: every member without an ``artifact`` or ``failed`` event
is unfinished and resumes from its own newest checkpoint in the next pack. A problem with the pack itself (no
members, members of different base models or strategies) is a user error of the whole job (``PREFIXFLOW_ERROR``,
exit 3).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefix_core.files import atomic_write
from prefix_core.train_pace import clock
from prefixflow.launch.protocol import USER_ERROR_EXIT
from prefixflow.launch.train_job import (
    TrainJob,
    UserError,
    encode_inputs,
    job_inputs,
    loaded_event,
    print_error,
    print_event,
    step_hook,
    warm_start_event,
    warm_started,
    write_artifact,
)
from prefixflow.launch.usage import peak_host_mb, usage_event

# Deferred imports: prefix_core's torch modules are deferred to run_pack: a bad pack file is reported before
# torch loads.

log = logging.getLogger(__name__)


@dataclass
class PackJob:
    """What one packed launch trains: member name -> job file, and the rows of all members per forward (None:
    ``prefix_core.packed.ROWS_PER_FORWARD``)."""

    members: dict[str, str] = field(default_factory=dict)
    rows_per_forward: int | None = None

    def to_json(self, path: str | Path) -> Path:
        return atomic_write(path, json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def from_json(cls, path: str | Path) -> PackJob:
        try:
            data = json.loads(Path(path).read_text())
            return cls(members={str(k): str(v) for k, v in data["members"].items()},
                       rows_per_forward=None if data.get("rows_per_forward") is None
                       else int(data["rows_per_forward"]))
        except FileNotFoundError:
            raise ValueError(f"pack file {path} does not exist") from None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"pack file {path} is not a pack job ({err})") from None


def _member_emitter(name: str):
    return lambda event: print_event({**event, "member": name})


def _failed(name: str, err: BaseException, user_error: bool) -> None:
    message = " ".join(str(err).split()) or type(err).__name__
    print_event({"event": "failed", "member": name, "user_error": user_error,
                 "error": message if user_error else f"{type(err).__name__}: {message}"})


def run_pack(pack: PackJob) -> dict[str, Path]:
    """Train every member; returns member -> artifact path for the members that finished."""
    from prefix_core import PrefixError, PrefixModel, load_base_model
    from prefix_core.packed import Charge, PackedTraining
    from prefix_core.train import Trainer, make_accelerator

    started_at = clock()
    if not pack.members:
        raise UserError("the pack has no members")
    jobs, inputs = {}, {}
    for name, file in pack.members.items():
        try:
            jobs[name] = TrainJob.from_json(file)
            inputs[name] = job_inputs(jobs[name])
        except (ValueError, UserError) as err:
            jobs.pop(name, None)
            _failed(name, err, user_error=True)
    kinds = {(j.base_model, j.strategy) for j in jobs.values()}
    if len(kinds) > 1 or any(strategy != "single" for _, strategy in kinds):
        raise UserError(f"a pack trains members of one base model with strategy single; got {sorted(kinds)}")
    if not jobs:
        return {}
    acc = make_accelerator()
    if acc.num_processes != 1:
        raise UserError(f"a pack runs in one process; this launch started {acc.num_processes}")
    base, tokenizer = load_base_model(next(iter(kinds))[0], device=acc.device)
    hook = step_hook()
    trainers = {}
    for name, job in jobs.items():
        prefix_cfg, train_cfg, train, validation = inputs[name]
        emit = _member_emitter(name)
        try:
            model = PrefixModel(base, prefix_cfg, tokenizer=tokenizer)
            warm_started(job, model)
            train_enc, val_enc = encode_inputs(job, tokenizer, bool(base.config.is_encoder_decoder), train_cfg,
                                               train, validation)
            emit(loaded_event(job, acc, model, train_enc, val_enc))
            trainers[name] = Trainer(model, tokenizer, train_enc, train_cfg, val_enc, job.checkpoint_dir or None,
                                     [emit], acc)
            if (event := warm_start_event(job, trainers[name])) is not None:
                emit(event)
        except (ValueError, PrefixError) as err:  # its settings (batch sizes, template, init text ...)
            _failed(name, err, user_error=True)
            continue
        if hook is not None:
            trainers[name].step_hooks.append(hook)
    paths: dict[str, Path] = {}
    if not trainers:
        return paths
    rows = {} if pack.rows_per_forward is None else {"rows_per_forward": pack.rows_per_forward}
    packed = PackedTraining(trainers, started_at=started_at, **rows)

    def usage(name: str, charge: Charge) -> None:
        _member_emitter(name)(usage_event(acc.device, 1, charge.wall_s, charge.cpu_s, charge.tokens,
                                          clock()[0] - started_at[0], peak_host_mb(), len(trainers)))

    def finished(name: str, result) -> None:
        paths[name] = write_artifact(jobs[name], trainers[name].model, result, inputs[name][1], 1)
        usage(name, packed.usage(name))  # its artifact's writing charged to it
        _member_emitter(name)({"event": "artifact", "path": str(paths[name])})

    def failed(name: str, err: Exception) -> None:
        usage(name, packed.ledger.charges[name])  # what it cost until it failed
        _failed(name, err, user_error=isinstance(err, (UserError, PrefixError)))

    packed.run(on_finish=finished, on_fail=failed)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if len(args) != 1:
        print_error("usage: python -m prefixflow.launch.pack_job PACK.json")
        return USER_ERROR_EXIT
    from prefix_core import PrefixError

    try:
        pack = PackJob.from_json(args[0])
    except ValueError as err:
        print_error(str(err))
        return USER_ERROR_EXIT
    try:
        run_pack(pack)
    except (UserError, PrefixError) as err:
        print_error(str(err))
        sys.stderr.flush()
        os._exit(USER_ERROR_EXIT)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the work is done and every artifact written: skip the interpreter's teardown (seconds with torch)


if __name__ == "__main__":
    sys.exit(main())
