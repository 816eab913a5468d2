"""Running a training launch as a gang.

``run_launch`` runs the command in its own process group (session) and treats it as a gang:

* merged stdout/stderr go line by line to ``log_file``; ``PREFIXFLOW_EVENT`` lines are parsed and
  handed to ``on_event``; a ``PREFIXFLOW_ERROR`` line is a user error (reason ``user_error``);
* a dying rank: torchrun (under accelerate) stops the other ranks itself (SIGTERM, then SIGKILL
  after 30 s) and exits non-zero. As a bound that does not depend on the launcher, once a rank
  process is gone and the group is still alive ``GANG_GRACE_S`` later, the whole group is killed;
* a hang (no output line for ``hang_timeout_s``) kills the group: SIGTERM, then SIGKILL after
  ``TERM_GRACE_S``; reason ``hung``;
* once the job says its work is written (an ``artifact`` event of a single job), its processes get
  ``TEARDOWN_GRACE_S`` to exit; ``done`` tells the caller the artifact event came, whatever happened after
  (a process-group teardown can hang: pytorch/pytorch#75097);
* whatever way the launcher ends, every process left in its group is killed, so no rank outlives
  the call;
* one launch of a run at a time (:class:`RunLock`, by default on ``.LOG.lock``): the group inherits the lock,
  so it outlives a caller killed with SIGKILL; the next launch of that run (``prefixflow run --run-key K``)
  stops a group left running that way before it starts, and refuses while the caller that holds it lives, so
  two trainings never write one run's checkpoints.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prefixflow import processes
from prefixflow.launch.command import Launch
from prefixflow.launch.protocol import ERROR_PREFIX, EVENT_PREFIX, USER_ERROR_EXIT
from prefixflow.services.errors import TrainingError
from prefixflow.services.spec import HANG_TIMEOUT_S

TAIL_LINES = 40
TERM_GRACE_S = processes.TERM_GRACE_S  # SIGTERM -> SIGKILL
GANG_GRACE_S = 60.0  # a rank is gone: the rest of the group must be gone this much later
POLL_S = 0.25
TEARDOWN_GRACE_S = 60.0  # after a job's artifact event: how long its processes may take to exit


@dataclass
class LaunchResult:
    returncode: int
    reason: str  # "ok" | "failed" | "hung" | "user_error"
    error: str | None  # the PREFIXFLOW_ERROR message, or a one-line summary of the failure
    tail: list[str]  # last ~40 output lines
    done: bool = False  # the job's artifact event came (its work was written), whatever the reason



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
_MACHINE_END = re.compile(r"^training (?:hung|failed|user_error) on machine \d+: ")  # launch.node_launch


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


LOCK_WAIT_S = 30.0  # after stopping a group left running: how long its lock may take to be released
logger = logging.getLogger(__name__)


class RunLock:
    """The exclusive lock of one run's launches (``flock`` on ``path``), taken by the command that launches and
    inherited by the launched process group. The file says who holds it: ``PGID OWNER_PID`` (PGID 0 before
    the launch starts). Taking it: free -> taken; held by a live command -> TrainingError (the run is
    another command's); held only by a group whose command is gone (SIGKILL) -> that group is stopped first,
    and :attr:`note` says so; held by a training pack of this very command, which this run left (it failed there
    and is retried) while the others train on -> taken once that pack ends."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd, self.note = Path(path), -1, None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fields = os.pread(fd, 64, 0).decode(errors="replace").split()
            pgid, owner = ((int(fields[0]), int(fields[1])) if len(fields) >= 2 and all(f.isdigit() for f in fields[:2])
                           else (0, None))
            if owner == os.getpid():  # a pack of this command that this run has left still runs (launch.packing)
                logger.info("waiting for the training pack that trained this run before to end (%s)", self.path.parent)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self.fd = fd
                self.held_by(0)
                return self
            if owner is not None and processes.alive(owner):
                os.close(fd)
                raise TrainingError(f"this run is being trained by another command (pid {owner}, {self.path.parent});"
                                    " wait for it to finish, or stop it and run this again (it resumes from the newest "
                                    "checkpoint)") from None
            if pgid and processes.group_alive(pgid):
                self.note = (f"stopped the training left running by an earlier command that was killed (process "
                             f"group {pgid}) before resuming")
                logger.warning(self.note)
                processes.stop_group(pgid, TERM_GRACE_S)
            self._wait(fd, " ".join(fields))
        self.fd = fd
        self.held_by(0)
        return self

    def _wait(self, fd: int, holder: str) -> None:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RuntimeError(f"another launch holds {self.path} ({holder or 'no holder written'}) and "
                                       f"did not stop within {LOCK_WAIT_S:g} s") from None
                time.sleep(POLL_S)

    def held_by(self, pgid: int) -> None:
        """Record the launched group (0: none yet) and this process as the owner."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pgid} {os.getpid()}".encode(), 0)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # the lock goes with the last holder: the group is gone by now


def _reader(stream, out: queue.Queue) -> None:
    try:
        for raw in iter(stream.readline, b""):
            out.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
    finally:
        out.put(None)


def run_launch(launch: Launch, on_event: Callable[[dict], None], *, log_file: Path,
               hang_timeout_s: float = HANG_TIMEOUT_S, cwd: Path | None = None,
               lock: RunLock | None = None, also_held: Sequence[RunLock] = ()) -> LaunchResult:
    """Run ``launch`` as a gang (see the module docstring) and say how it ended. ``lock``: the run's lock, held
    by the caller (else one on ``.LOG.lock`` is taken for the launch); ``also_held``: the other runs' locks of a
    pack, which the group holds too."""
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if lock is None:
        with RunLock(log_file.with_name(f".{log_file.name}.lock")) as own:
            return run_launch(launch, on_event, log_file=log_file, hang_timeout_s=hang_timeout_s, cwd=cwd, lock=own,
                              also_held=also_held)
    env = {**os.environ, **launch.env}
    marker = _rank_marker(launch.argv)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    summary_lines: deque[str] = deque(maxlen=400)  # enough for torchrun's failure report
    user_error: str | None = None
    forced: tuple[str, str] | None = None  # (reason, error) when we tore the group down
    done = False  # a single job's artifact event was seen
    lines: queue.Queue = queue.Queue()

    with open(log_file, "a", encoding="utf-8") as log:
        if lock.note:
            log.write(f"prefixflow: {lock.note}\n")
        proc = processes.start(launch.argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               pass_fds=(lock.fd, *(held.fd for held in also_held)))  # held even if we are killed
        pgid = proc.pid  # start_new_session: the launcher leads a new session and process group
        for held in (lock, *also_held):
            held.held_by(pgid)
        reader = threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True)
        reader.start()

        def handle(line: str) -> None:
            nonlocal user_error, done
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
                done = done or (event.get("event") == "artifact" and "member" not in event)
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
                if processes.stop_requested():  # this command is stopping; this thread is not its main thread
                    forced = ("stopped", "the command was stopped")
                    processes.stop_group(pgid, TERM_GRACE_S, proc)
                    break
                limit = min(hang_timeout_s, TEARDOWN_GRACE_S) if done else hang_timeout_s
                if last_output is not None and now - last_output > limit:
                    forced = ("hung", f"its artifact was written but its processes had not exited {limit:g} s later; "
                                      "the process group was killed" if done else
                                      f"no output for {limit:g} s; the process group was killed")
                    processes.stop_group(pgid, TERM_GRACE_S, proc)
                    break
                if marker and now >= next_scan:
                    next_scan = now + 0.5
                    pids = processes.group_pids(pgid)
                    if pids is not None:
                        ranks = {p for p in pids if p != proc.pid and marker in processes.cmdline(p)}
                        if ranks_seen - ranks and rank_gone_at is None:
                            rank_gone_at = now
                        ranks_seen |= ranks
                    if rank_gone_at is not None and now - rank_gone_at > GANG_GRACE_S:
                        forced = ("failed", f"a rank exited and the others were still running {GANG_GRACE_S:g} s "
                                            "later; the process group was killed")
                        processes.stop_group(pgid, TERM_GRACE_S, proc)
                        break
        except BaseException:
            processes.stop_group(pgid, TERM_GRACE_S, proc)
            raise
        finally:
            # Whatever happened, nothing of the group may outlive the launcher.
            if processes.group_alive(pgid, proc):
                processes.stop_group(pgid, 2.0 if proc.poll() is not None else TERM_GRACE_S, proc)
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

    if forced is not None and forced[0] == "stopped":
        raise processes.Stopped(f"stopped: {launch.argv[-1]}")
    if forced is not None:
        reason, error = forced
    elif (user_error is not None and returncode != 0) or returncode == USER_ERROR_EXIT:
        reason, error = "user_error", user_error or f"the job exited with code {USER_ERROR_EXIT} (user error)"
    elif returncode == 0:
        reason, error = "ok", None
    else:
        reason, error = "failed", _summarize(list(summary_lines), returncode)
    return LaunchResult(returncode, reason, error, list(tail), done)
