"""Launching the training job: the ``accelerate launch`` command for a strategy, and running it as a gang.

``build_launch`` turns a :class:`~tasks.spec.TrainSpec` into the command that starts
``python -m prefixflow.launch.train_job JOB.json`` in every process of one machine, from the config files in
``infra/accelerate/`` and ``infra/deepspeed/``:

==================  ======================================================================
single              1 process (accelerate's simple launcher)
ddp                 torch DDP, ``processes_per_machine x machines`` processes (torchrun)
deepspeed-zero2/3   DeepSpeed ZeRO stage 2/3 (torchrun, "standard" multinode launcher); only
                    the prefix is trainable, under ZeRO-3 the frozen base is sharded too
==================  ======================================================================

On a machine without a GPU the ranks run on CPU with gloo (``ACCELERATE_USE_CPU=1``, and
``DS_ACCELERATOR=cpu`` for DeepSpeed; see docs/scale-out.md); with GPUs they use NCCL, and an existing
``CUDA_VISIBLE_DEVICES`` is inherited unchanged. Mixed precision is always
``--mixed_precision no`` for accelerate: it is the trainer's own autocast
(``TrainConfig.mixed_precision``), identical under every strategy (accelerate's bf16 under
DeepSpeed would cast the frozen base weights to bf16).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from prefixflow.launch.protocol import JOB_MODULE
from prefixflow.services.spec import STRATEGIES, TrainSpec

# Deferred imports: torch (to count GPUs) is deferred to the call that needs it: building a command stays light.

INFRA = Path(str(files("prefixflow.infra")))  # the config files travel with the package
ACCELERATE_CONFIGS = {
    "single": INFRA / "accelerate" / "single.yaml",
    "ddp": INFRA / "accelerate" / "ddp.yaml",
    "deepspeed-zero2": INFRA / "accelerate" / "deepspeed.yaml",
    "deepspeed-zero3": INFRA / "accelerate" / "deepspeed.yaml",
}
assert set(ACCELERATE_CONFIGS) == set(STRATEGIES)
DEEPSPEED_CONFIGS = {
    "deepspeed-zero2": INFRA / "deepspeed" / "zero2.json",
    "deepspeed-zero3": INFRA / "deepspeed" / "zero3.json",
}


@dataclass
class Launch:
    argv: list[str]  # [sys.executable, "-m", "accelerate.commands.launch", ..., "-m", JOB_MODULE, job_file]
    env: dict[str, str] = field(default_factory=dict)  # additions to os.environ
    queued: bool = False  # waits in a scheduler's queue first: the hang clock starts at its first output


# --- building the command ------------------------------------------------------------------------
def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``address`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def visible_gpus() -> int:
    """Number of CUDA devices this process may use (honours CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no torch, or a broken driver: treat as no GPU
        return 0


def cpu_threads_per_process(processes: int) -> int:
    """Compute threads of each of ``processes`` CPU ranks: the cores shared out, at most ``$OMP_NUM_THREADS``
    when that is set (a limit the caller chose, e.g. one test worker of two on a 2-core machine)."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(limit)) if limit.isdigit() and int(limit) > 0 else threads


def build_launch(train: TrainSpec, job_file: Path, *, machine_rank: int = 0, main_address: str | None = None,
                 main_port: int | None = None) -> Launch:
    """The ``accelerate launch`` command for ``train.strategy`` on this machine (``machine_rank`` of
    ``train.machines``). ``main_address``/``main_port`` default to the spec's; with one machine and no
    port a free local port is picked."""
    strategy = train.strategy
    if strategy not in ACCELERATE_CONFIGS:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(ACCELERATE_CONFIGS)}")
    per_machine, machines = train.processes_per_machine, train.machines
    if not 0 <= machine_rank < machines:
        raise ValueError(f"machine_rank {machine_rank} is outside 0..{machines - 1}")
    address = main_address or getattr(train, "main_address", None) or "127.0.0.1"
    port = main_port or getattr(train, "main_port", None)
    if port is None:
        if machines > 1:
            raise ValueError("a multi-machine launch needs a fixed main_port that every machine agrees on")
        port = free_port(address if address in ("127.0.0.1", "localhost") else "")
    gpus = visible_gpus()
    on_cpu = gpus == 0
    if not on_cpu and per_machine > gpus:
        raise ValueError(
            f"{per_machine} processes per machine but only {gpus} visible GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); lower processes_per_machine"
        )

    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS[strategy]),
            "--num_processes", str(per_machine * machines), "--num_machines", str(machines),
            "--machine_rank", str(machine_rank), "--main_process_ip", address, "--main_process_port", str(port),
            "--mixed_precision", "no", "--dynamo_backend", "no"]
    if strategy == "ddp":
        argv.append("--multi_gpu")
    elif strategy.startswith("deepspeed"):
        argv += ["--use_deepspeed", "--deepspeed_config_file", str(DEEPSPEED_CONFIGS[strategy]),
                 "--zero3_init_flag", "false", "--deepspeed_multinode_launcher", "standard"]
    if on_cpu:
        argv += ["--num_cpu_threads_per_process", str(cpu_threads_per_process(per_machine))]
    argv += ["-m", JOB_MODULE, str(job_file)]

    env = {
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if on_cpu:
        if strategy.startswith("deepspeed"):
            # Not ACCELERATE_USE_CPU: it turns DeepSpeed off inside Accelerator. The job names the
            # gloo backend itself (prefix_core.train.make_accelerator).
            env["DS_ACCELERATOR"] = "cpu"
        else:
            env["ACCELERATE_USE_CPU"] = "1"  # with --multi_gpu: gloo ranks on CPU
    else:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # a collective with a dead peer errors, not hangs
        if strategy.startswith("deepspeed"):
            env["DS_ACCELERATOR"] = "cuda"
    return Launch(argv, env)




def build_one_process(job_file: Path, module: str) -> Launch:
    """One process of ``module`` on this machine, started directly rather than through ``accelerate launch``:
    the environment accelerate's simple launcher would give a ``single`` process (CPU or the visible GPU, no
    mixed precision or dynamo: the trainer's own autocast), without the launcher's own interpreter and torch
    import (seconds of every launch). Used for a pack (:mod:`prefixflow.launch.packing`)."""
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_MIXED_PRECISION": "no",
           "ACCELERATE_DYNAMO_BACKEND": "NO"}
    if visible_gpus() == 0:
        env.update(ACCELERATE_USE_CPU="True", KMP_AFFINITY="granularity=fine,compact,1,0", KMP_BLOCKTIME="1",
                   OMP_NUM_THREADS=str(cpu_threads_per_process(1)))
    return Launch([sys.executable, "-m", module, str(job_file)], env)
