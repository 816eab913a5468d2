"""What each machine of a multi-machine training runs: this machine's ranks of one ``job.json``.

    python -m prefixflow.launch.node_launch JOB.json --strategy ddp --processes-per-machine 4 --machines 2 \\
        [--machine-rank N] [--main-address HOST] [--main-port P] [--hang-timeout-s T]

It is :func:`prefixflow.launch.command.build_launch` + :func:`prefixflow.launch.gang.run_launch` for this
machine: a dying rank
kills every rank of the machine and the command exits non-zero, which the scheduler turns into the end
of the whole training (Kubernetes: ``podFailurePolicy`` fails the Job; Slurm: ``srun --kill-on-bad-exit``).
Exit codes: 0 done, 3 user error (bad job: not worth a retry), 1 anything else, 2 bad arguments.

Where a value is not given it comes from the scheduler:

* machine rank: ``$JOB_COMPLETION_INDEX`` (a Kubernetes Indexed Job), else ``$SLURM_PROCID`` (one task
  per node);
* main address: on Slurm, the ``NodeAddr`` of the first node of ``$SLURM_JOB_NODELIST`` (``scontrol``);
* main port: on Slurm, ``20000 + SLURM_JOB_ID % 20000``, so trainings sharing nodes do not collide.

Only machine 0 prints progress (the job's main process), so only machine 0 treats ``--hang-timeout-s``
without output as a hang; a stuck rank anywhere stalls the collectives and so machine 0's output too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from prefixflow.launch.command import build_launch
from prefixflow.launch.gang import run_launch
from prefixflow.launch.protocol import ERROR_PREFIX, EVENT_PREFIX, USER_ERROR_EXIT
from prefixflow.services.spec import HANG_TIMEOUT_S, TrainSpec

SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


class SchedulerEnvError(ValueError):
    """The machine's rank or the main address is neither given nor derivable from the environment."""


def wait_for_host(address: str, timeout_s: float, poll_s: float = 2.0) -> None:
    """Block until ``address`` resolves (on Kubernetes, pod 0's DNS record appears once it has an IP)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(address, None)
            return
        except socket.gaierror as err:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{address} did not resolve within {timeout_s:g} s ({err}); on Kubernetes: is "
                                   "the headless Service there and the pod's subdomain its name?") from None
            time.sleep(poll_s)


def machine_rank_from_env(env: dict[str, str]) -> int:
    for var in ("JOB_COMPLETION_INDEX", "SLURM_PROCID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    raise SchedulerEnvError("no --machine-rank, and neither JOB_COMPLETION_INDEX (Kubernetes Indexed Job) nor "
                            "SLURM_PROCID (srun) is set")


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def slurm_main_address(env: dict[str, str]) -> str:
    """The address of the first node of this Slurm job (its ``NodeAddr``, the node name by default)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise SchedulerEnvError("no --main-address and no SLURM_JOB_NODELIST to derive it from")
    first = _scontrol("show", "hostnames", nodelist).split()[0]
    found = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "-o", first))
    return found.group(1) if found else first


def slurm_main_port(env: dict[str, str]) -> int | None:
    job_id = env.get("SLURM_JOB_ID", "")
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN if job_id.isdigit() else None


def launch_machine(job_file: Path, train: TrainSpec, machine_rank: int, *, dns_timeout_s: float = 600) -> int:
    """Run this machine's ranks of ``job_file`` as a gang; returns the exit code for the scheduler."""

    wait_for_host(train.main_address, dns_timeout_s)
    launch = build_launch(train, job_file, machine_rank=machine_rank)
    log_file = job_file.parent / f"train-machine{machine_rank}.log"
    print(f"machine {machine_rank} of {train.machines} ({socket.gethostname()}): {' '.join(launch.argv)} "
          f"(log: {log_file})", flush=True)

    def show(event: dict) -> None:
        print(EVENT_PREFIX + json.dumps(event, default=str), flush=True)

    hang_timeout_s = train.hang_timeout_s if machine_rank == 0 else float("inf")
    result = run_launch(launch, show, log_file=log_file, hang_timeout_s=hang_timeout_s)
    if result.reason == "ok":
        return 0
    if result.reason == "user_error":
        print(f"{ERROR_PREFIX}{result.error}", flush=True)
    print("\n".join(result.tail), file=sys.stderr)
    print(f"training {result.reason} on machine {machine_rank}: {result.error}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT if result.reason == "user_error" else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prefixflow.launch.node_launch", description=__doc__.split("\n")[0])
    parser.add_argument("job_file", type=Path)
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--processes-per-machine", type=int, required=True)
    parser.add_argument("--machines", type=int, required=True)
    parser.add_argument("--machine-rank", type=int, help="default: $JOB_COMPLETION_INDEX, else $SLURM_PROCID")
    parser.add_argument("--main-address", help="default on Slurm: the first node's address")
    parser.add_argument("--main-port", type=int, help="default on Slurm: derived from $SLURM_JOB_ID")
    parser.add_argument("--hang-timeout-s", type=float, default=HANG_TIMEOUT_S)
    parser.add_argument("--dns-timeout-s", type=float, default=600)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(os.environ)
    try:
        rank = args.machine_rank if args.machine_rank is not None else machine_rank_from_env(env)
        address = args.main_address or slurm_main_address(env)
        port = args.main_port or slurm_main_port(env)
        if port is None:
            raise SchedulerEnvError("no --main-port and no SLURM_JOB_ID to derive it from")
        train = TrainSpec(strategy=args.strategy, processes_per_machine=args.processes_per_machine,
                          machines=args.machines, main_address=address, main_port=port,
                          hang_timeout_s=args.hang_timeout_s)
    except (SchedulerEnvError, ValueError, subprocess.SubprocessError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Kubernetes and Slurm stop a task with SIGTERM, which PID 1 would ignore: exit, and run_launch's
    # cleanup kills the ranks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return launch_machine(args.job_file, train, rank, dns_timeout_s=args.dns_timeout_s)


if __name__ == "__main__":
    sys.exit(main())
