"""The serving usage log: requests, prompt tokens and completion tokens per client and hour, appended by every
server process and added up by whoever reads it (``prefixflow usage``).

Layout: one folder (``$PREFIXFLOW_USAGE_DIR``, default ``$PREFIXFLOW_HOME/usage``; a shared volume when several
replicas serve) holding one file per server process, ``serving-HOST-PID-STARTED.jsonl``, so no two writers ever
share a file. Each line is what that process counted for one client and one model (the request's ``model`` as
named; absent in lines of older servers) in one UTC hour since its previous flush::

    {"hour": "2026-12-07T08:00:00Z", "client": "acme", "model": "acme/summ@champion", "requests": 3,
     "prompt_tokens": 120, "completion_tokens": 48}

A flush appends complete lines in one write and fsyncs, every ``flush_s`` and when the server stops, so a restart
loses at most the last ``flush_s`` of a process killed hard; totals are the sum of all lines of all files (an
unfinished last line of a killed process is skipped).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)
COUNTS = ("requests", "prompt_tokens", "completion_tokens")


def _hour(at: float) -> str:
    return datetime.fromtimestamp(at - at % 3600, tz=UTC).strftime("%Y-%m-%dT%H:00:00Z")


class UsageLog:
    """Counts of one server process, appended to its own file in ``folder`` (created on the first flush)."""

    def __init__(self, folder: Path, flush_s: float = 30.0) -> None:
        self.folder, self.flush_s = Path(folder), flush_s
        started = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.path = self.folder / f"serving-{socket.gethostname()}-{os.getpid()}-{started}.jsonl"
        self._pending: dict[tuple[str, str, str | None], list[int]] = defaultdict(lambda: [0, 0, 0])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, client: str, requests: int = 0, prompt_tokens: int = 0, completion_tokens: int = 0,
            model: str | None = None) -> None:
        """Count for ``client`` (and the ``model`` its request named) in the current hour (cheap: called per
        token)."""
        with self._lock:
            counts = self._pending[(_hour(time.time()), client, model)]
            counts[0] += requests
            counts[1] += prompt_tokens
            counts[2] += completion_tokens

    def flush(self) -> None:
        """Append what was counted since the last flush (nothing when nothing was)."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: [0, 0, 0])
        if not pending:
            return
        text = "".join(json.dumps({"hour": hour, "client": client, **({"model": model} if model else {}),
                                   **dict(zip(COUNTS, counts, strict=True))}) + "\n"
                       for (hour, client, model), counts in sorted(pending.items(), key=lambda kv: str(kv[0])))
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:  # counted again at the next flush: nothing is lost while the process lives
            log.warning("usage log %s not written (%s); retried at the next flush", self.path, err)
            with self._lock:
                for key, counts in pending.items():
                    mine = self._pending[key]
                    for i, n in enumerate(counts):
                        mine[i] += n

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="usage-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()


def read_usage(folder: Path, since: float | None = None, client: str | None = None) -> dict[str, dict[str, int]]:
    """Client -> summed counts over every server's file in ``folder``, for the hours that end after ``since``
    (seconds since the epoch; None: all)."""
    totals: dict[str, dict[str, int]] = {}
    for row in _rows(folder, since):
        if client is None or row["client"] == client:
            mine = totals.setdefault(str(row["client"]), dict.fromkeys(COUNTS, 0))
            for k in COUNTS:
                mine[k] += row[k]
    return totals


def most_used_models(folder: Path, since: float | None = None, limit: int = 64) -> list[str]:
    """The ``limit`` models named by the most requests over every server's file in ``folder`` (hours that end
    after ``since``), most used first; ``base`` and lines without a model are left out."""
    requests: dict[str, int] = defaultdict(int)
    for row in _rows(folder, since):
        if row.get("model") and row["model"] != "base":
            requests[str(row["model"])] += row["requests"]
    return sorted(requests, key=lambda m: (-requests[m], m))[:limit]


def _rows(folder: Path, since: float | None) -> Iterator[dict]:
    """The well-formed lines of every file in ``folder`` for the hours that end after ``since``, counts as int."""
    first_hour = _hour(since) if since is not None else ""
    for path in sorted(Path(folder).glob("serving-*.jsonl")) if Path(folder).is_dir() else []:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    if row["hour"] < first_hour:
                        continue
                    yield {**row, "client": str(row["client"]), **{k: int(row[k]) for k in COUNTS}}
                except (ValueError, KeyError, TypeError):  # an unfinished last line of a killed process
                    continue
