"""Multi-machine training through Slurm (``train.launcher: slurm``).

The flow runs one foreground ``srun`` (``build_srun``): ``train.machines`` nodes, one task per node,
each task ``python -m prefixflow.launch.node_launch JOB.json ...`` (that machine's ranks, rank from
``$SLURM_PROCID``, rendezvous at the first node). ``srun`` relays the tasks' output, so the flow sees
machine 0's progress lines exactly as from a local launch and :func:`prefixflow.launch.gang.run_launch` applies
the same teardown (SIGTERM to ``srun`` is forwarded to every task); the time the job waits in the queue
(``--quiet``: no output until a node starts) does not count towards the hang timeout. Gang semantics
across nodes are Slurm's: ``--kill-on-bad-exit=1`` ends every task when one exits non-zero.

Every run has its own job name; before a launch, ``cancel_leftovers`` cancels any job of that name
still queued or running (an earlier try whose flow process died), so two gangs never write the same
checkpoints. Needs ``srun``, ``scancel`` and ``squeue`` on the machine running the flow, and the run
folder, the project and its Python at the same paths on every node (a shared filesystem).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from prefixflow.launch.command import Launch
from prefixflow.services.spec import TrainSpec

NODE_MODULE = "prefixflow.launch.node_launch"
COMMANDS = ("srun", "scancel", "squeue")
HANG_MARGIN_S = 60.0  # machine 0 detects a hang itself and says so; the flow's timer is the backstop


def flow_hang_timeout(train: TrainSpec) -> float:
    """How long the flow waits without output from ``srun``: machine 0's own ``hang_timeout_s`` first
    ends the step with a clear message; this only catches ``srun`` itself stalling."""
    return train.hang_timeout_s + HANG_MARGIN_S


class SlurmUnavailable(RuntimeError):
    """Slurm's commands are not on PATH here."""


def job_name(client: str, task: str, run_key: str) -> str:
    """The Slurm job name of one pipeline run's training (unique per run)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"prefixflow-{client}-{task}-{run_key}")[:200]


def check_commands() -> None:
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        raise SlurmUnavailable(
            f"train.launcher is slurm but {', '.join(missing)} not found on PATH of the machine running the flow; "
            "run the flow on a Slurm login/submit node (with SLURM_CONF set if the config is not in /etc/slurm)")


def build_srun(train: TrainSpec, job_file: Path, name: str) -> Launch:
    """The foreground ``srun`` that runs ``job_file`` on ``train.machines`` nodes."""
    s = train.slurm
    argv = ["srun", "--quiet", f"--job-name={name}", f"--nodes={train.machines}", f"--ntasks={train.machines}",
            "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--chdir={job_file.parent}"]
    for flag, value in (("--partition", s.partition), ("--account", s.account), ("--time", s.time_limit),
                        ("--gpus-per-node", s.gpus_per_node), ("--cpus-per-task", s.cpus_per_task)):
        if value is not None:
            argv.append(f"{flag}={value}")
    argv += s.extra_args
    argv += [sys.executable, "-m", NODE_MODULE, str(job_file), "--strategy", train.strategy,
             "--processes-per-machine", str(train.processes_per_machine), "--machines", str(train.machines),
             "--hang-timeout-s", f"{train.hang_timeout_s:g}"]
    if train.main_port is not None:
        argv += ["--main-port", str(train.main_port)]
    env = {"PYTHONUNBUFFERED": "1"}
    return Launch(argv, env, queued=True)  # no output while the job waits for nodes: not a hang


def _queued(name: str) -> list[str]:
    out = subprocess.run(["squeue", "--noheader", f"--name={name}", "--format=%i %T"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def cancel_leftovers(name: str, timeout_s: float = 120.0) -> list[str]:
    """Cancel every job called ``name`` and wait until Slurm lists none; returns what was cancelled."""
    found = _queued(name)
    if not found:
        return []
    subprocess.run(["scancel", f"--name={name}"], capture_output=True, text=True, timeout=60, check=True)
    deadline = time.monotonic() + timeout_s
    while _queued(name):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Slurm job(s) {name} still listed {timeout_s:g} s after scancel: {_queued(name)}")
        time.sleep(1.0)
    return found
