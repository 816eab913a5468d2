"""Launching the training job: the ``accelerate launch`` command for a strategy, and running it as a gang.

``build_launch`` turns a :class:`~tasks.spec.TrainSpec` into the command that starts
``python -m tasks.train_job JOB.json`` in every process of one machine, from the config files in
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

``run_launch`` runs the command in its own process group (session) and treats it as a gang:

* merged stdout/stderr go line by line to ``log_file``; ``PREFIXFLOW_EVENT`` lines are parsed and
  handed to ``on_event``; a ``PREFIXFLOW_ERROR`` line is a user error (reason ``user_error``);
* a dying rank: torchrun (under accelerate) stops the other ranks itself (SIGTERM, then SIGKILL
  after 30 s) and exits non-zero. As a bound that does not depend on the launcher, once a rank
  process is gone and the group is still alive ``GANG_GRACE_S`` later, the whole group is killed;
* a hang (no output line for ``hang_timeout_s``) kills the group: SIGTERM, then SIGKILL after
  ``TERM_GRACE_S``; reason ``hung``;
* whatever way the launcher ends, every process left in its group is killed, so no rank outlives
  the call.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tasks.spec import TrainSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
INFRA = REPO_ROOT / "infra"
ACCELERATE_CONFIGS = {
    "single": INFRA / "accelerate" / "single.yaml",
    "ddp": INFRA / "accelerate" / "ddp.yaml",
    "deepspeed-zero2": INFRA / "accelerate" / "deepspeed.yaml",
    "deepspeed-zero3": INFRA / "accelerate" / "deepspeed.yaml",
}
DEEPSPEED_CONFIGS = {
    "deepspeed-zero2": INFRA / "deepspeed" / "zero2.json",
    "deepspeed-zero3": INFRA / "deepspeed" / "zero3.json",
}
JOB_MODULE = "tasks.train_job"
EVENT_PREFIX = "PREFIXFLOW_EVENT "
ERROR_PREFIX = "PREFIXFLOW_ERROR "
USER_ERROR_EXIT = 3
TAIL_LINES = 40
TERM_GRACE_S = 10.0  # SIGTERM -> SIGKILL
GANG_GRACE_S = 60.0  # a rank is gone: the rest of the group must be gone this much later
POLL_S = 0.25


@dataclass
class Launch:
    argv: list[str]  # [sys.executable, "-m", "accelerate.commands.launch", ..., "-m", "tasks.train_job", job_file]
    env: dict[str, str] = field(default_factory=dict)  # additions to os.environ
    queued: bool = False  # waits in a scheduler's queue first: the hang clock starts at its first output


@dataclass
class LaunchResult:
    returncode: int
    reason: str  # "ok" | "failed" | "hung" | "user_error"
    error: str | None  # the PREFIXFLOW_ERROR message, or a one-line summary of the failure
    tail: list[str]  # last ~40 output lines


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
        threads = max(1, (os.cpu_count() or 1) // per_machine)
        argv += ["--num_cpu_threads_per_process", str(threads)]
    argv += ["-m", JOB_MODULE, str(job_file)]

    env = {
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
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


# --- the process group -----------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "
    return rest[0], int(rest[2])


def _group_pids(pgid: int) -> list[int] | None:
    """Live (non-zombie) processes of group ``pgid``; None where /proc cannot tell."""
    if not Path("/proc/self/stat").exists():
        return None
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


def _group_alive(pgid: int) -> bool:
    pids = _group_pids(pgid)
    if pids is not None:
        return bool(pids)
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_group(pgid: int, grace_s: float = TERM_GRACE_S, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the whole group, SIGKILL whatever is left after ``grace_s``; returns once it is gone."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()  # reap the leader so it does not linger as a zombie
        if not _group_alive(pgid):
            return
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not _group_alive(pgid):
            return
        time.sleep(0.05)


def _rank_marker(argv: list[str]) -> str | None:
    """The module the ranks run (what follows the last ``-m``), to recognise rank processes."""
    idx = [i for i, a in enumerate(argv) if a == "-m" and i > 1]  # argv[1] == "-m" is the launcher's own
    if not idx or idx[-1] + 1 >= len(argv):
        return None
    return argv[idx[-1] + 1]


# --- the summary -----------------------------------------------------------------------------------
_EXC_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))(?::\s*(.*))?$")
_TORCHRUN_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_TORCHRUN_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
_CALLED_SIGNAL = re.compile(r"CalledProcessError: .* died with <Signals\.\w+: (\d+)>")
_CALLED_STATUS = re.compile(r"CalledProcessError: .* returned non-zero exit status (-?\d+)")
_BORING = ("ChildFailedError", "CalledProcessError", "SignalException")
_MACHINE_END = re.compile(r"^training (?:hung|failed|user_error) on machine \d+: ")  # infra.node_launch


def _summarize(lines: list[str], returncode: int) -> str:
    """One line saying why the launch failed: the rank's exception, and which rank died how (for a
    multi-machine launch: the first machine that reported its end)."""
    machine = next((line.strip() for line in lines if _MACHINE_END.match(line.strip())), None)
    if machine is not None:
        return machine[:1000]
    exc = None
    for line in lines:
        m = _EXC_LINE.match(line.strip())
        if m and not any(b in m.group(1) for b in _BORING):
            exc = line.strip()
    rank = code = None
    root = max((i for i, line in enumerate(lines) if "Root Cause" in line), default=None)
    for line in lines[root:] if root is not None else []:  # torchrun's report of the first failure
        if rank is None and (m := _TORCHRUN_RANK.match(line)):
            rank = m.group(1)
        if code is None and (m := _TORCHRUN_EXIT.match(line)):
            code = int(m.group(1))
    if code is None:  # accelerate's single-process launcher: CalledProcessError of the one rank
        for line in lines:
            if (m := _CALLED_SIGNAL.search(line)) is not None:
                rank, code = "0", -int(m.group(1))
            elif (m := _CALLED_STATUS.search(line)) is not None:
                rank, code = "0", int(m.group(1))
    parts = []
    if rank is not None and code is not None:
        how = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else \
            f"exit code {code}"
        parts.append(f"rank {rank} died ({how})")
    if exc:
        parts.append(exc)
    if not parts:
        parts.append(f"launcher exited with code {returncode}")
    return "; ".join(parts)[:1000]


def _reader(stream, out: queue.Queue) -> None:
    try:
        for raw in iter(stream.readline, b""):
            out.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
    finally:
        out.put(None)


def run_launch(launch: Launch, on_event: Callable[[dict], None], *, log_file: Path, hang_timeout_s: float = 900,
               cwd: Path | None = None) -> LaunchResult:
    """Run ``launch`` as a gang (see the module docstring) and say how it ended."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **launch.env}
    marker = _rank_marker(launch.argv)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    summary_lines: deque[str] = deque(maxlen=400)  # enough for torchrun's failure report
    user_error: str | None = None
    forced: tuple[str, str] | None = None  # (reason, error) when we tore the group down
    lines: queue.Queue = queue.Queue()

    with open(log_file, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(launch.argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        pgid = proc.pid  # start_new_session: the launcher leads a new session and process group
        reader = threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True)
        reader.start()

        def handle(line: str) -> None:
            nonlocal user_error
            log.write(line + "\n")
            log.flush()
            tail.append(line)
            summary_lines.append(line)
            if line.startswith(EVENT_PREFIX):
                try:
                    event = json.loads(line[len(EVENT_PREFIX) :])
                except json.JSONDecodeError:
                    return
                on_event(event)
            elif line.startswith(ERROR_PREFIX) and user_error is None:
                user_error = line[len(ERROR_PREFIX) :].strip()

        try:
            last_output = None if launch.queued else time.monotonic()
            ranks_seen: set[int] = set()
            rank_gone_at: float | None = None
            next_scan = 0.0
            eof = False
            while True:
                try:
                    item = lines.get(timeout=POLL_S)
                except queue.Empty:
                    item = ""
                    empty = True
                else:
                    empty = False
                now = time.monotonic()
                if item is None:
                    eof = True
                elif not empty:
                    handle(item)
                    last_output = now
                if proc.poll() is not None:
                    break
                if last_output is not None and now - last_output > hang_timeout_s:
                    forced = ("hung", f"no output for {hang_timeout_s:g} s; the process group was killed")
                    kill_group(pgid, TERM_GRACE_S, proc)
                    break
                if marker and now >= next_scan:
                    next_scan = now + 0.5
                    pids = _group_pids(pgid)
                    if pids is not None:
                        ranks = {p for p in pids if p != proc.pid and marker in _cmdline(p)}
                        if ranks_seen - ranks and rank_gone_at is None:
                            rank_gone_at = now
                        ranks_seen |= ranks
                    if rank_gone_at is not None and now - rank_gone_at > GANG_GRACE_S:
                        forced = ("failed", f"a rank exited and the others were still running {GANG_GRACE_S:g} s "
                                            "later; the process group was killed")
                        kill_group(pgid, TERM_GRACE_S, proc)
                        break
        except BaseException:
            kill_group(pgid, TERM_GRACE_S, proc)
            raise
        finally:
            # Whatever happened, nothing of the group may outlive the launcher.
            if _group_alive(pgid):
                kill_group(pgid, 2.0 if proc.poll() is not None else TERM_GRACE_S, proc)
            returncode = proc.wait()

        # The rest of the output (the pipe closes once the whole group is gone).
        deadline = time.monotonic() + 10
        while not eof and time.monotonic() < deadline:
            try:
                item = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                eof = True
            else:
                handle(item)
        if proc.stdout is not None:
            proc.stdout.close()

    if forced is not None:
        reason, error = forced
    elif (user_error is not None and returncode != 0) or returncode == USER_ERROR_EXIT:
        reason, error = "user_error", user_error or f"the job exited with code {USER_ERROR_EXIT} (user error)"
    elif returncode == 0:
        reason, error = "ok", None
    else:
        reason, error = "failed", _summarize(list(summary_lines), returncode)
    return LaunchResult(returncode, reason, error, list(tail))
