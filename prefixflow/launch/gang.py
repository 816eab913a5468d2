"""Running a training launch as a gang.

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

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefixflow import processes
from prefixflow.launch.command import Launch
from prefixflow.launch.protocol import ERROR_PREFIX, EVENT_PREFIX, USER_ERROR_EXIT
from prefixflow.services.spec import HANG_TIMEOUT_S

TAIL_LINES = 40
TERM_GRACE_S = processes.TERM_GRACE_S  # SIGTERM -> SIGKILL
GANG_GRACE_S = 60.0  # a rank is gone: the rest of the group must be gone this much later
POLL_S = 0.25


@dataclass
class LaunchResult:
    returncode: int
    reason: str  # "ok" | "failed" | "hung" | "user_error"
    error: str | None  # the PREFIXFLOW_ERROR message, or a one-line summary of the failure
    tail: list[str]  # last ~40 output lines



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


def _reader(stream, out: queue.Queue) -> None:
    try:
        for raw in iter(stream.readline, b""):
            out.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
    finally:
        out.put(None)


def run_launch(launch: Launch, on_event: Callable[[dict], None], *, log_file: Path,
               hang_timeout_s: float = HANG_TIMEOUT_S, cwd: Path | None = None) -> LaunchResult:
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
        proc = processes.start(launch.argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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

    if forced is not None:
        reason, error = forced
    elif (user_error is not None and returncode != 0) or returncode == USER_ERROR_EXIT:
        reason, error = "user_error", user_error or f"the job exited with code {USER_ERROR_EXIT} (user error)"
    elif returncode == 0:
        reason, error = "ok", None
    else:
        reason, error = "failed", _summarize(list(summary_lines), returncode)
    return LaunchResult(returncode, reason, error, list(tail))
