"""Watching a task's data sources for new data (no Prefect here: ``flows.deploy`` turns a change into a Prefect
event, and a deployment trigger into a run).

A source's state is read from metadata only, never the data: the keys, sizes and ETags of the S3 objects under
an ``s3://`` URI (one object or a prefix), the size and modification time of a local file, or of every file
under a local folder (a saved datasets folder). :class:`DataWatcher` polls every watched source and calls back
once per settled change: a state that differs from the last one reported and then stays the same for one more
poll. A burst of uploads therefore makes one callback, after the last upload and within two polls of it.
What changed while no watcher ran is not reported (the first poll is the baseline); the deployment's schedule,
with ``retrain: on_change``, catches it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prefixflow.services.storage import s3_client, split_s3

log = logging.getLogger(__name__)

WATCH_EVENT = "prefixflow.data.changed"


def watch_resource(client: str, task: str) -> str:
    """The Prefect resource id of a (client, task)'s data: what its deployment trigger matches."""
    return f"prefixflow.data.{client}.{task}"


def source_state(uri: str) -> str | None:
    """A digest of what ``uri`` holds now (16 hex digits), from a listing; None when nothing is there yet.
    Raises OSError (a local read) or botocore's errors (S3) when the source cannot be listed."""
    entries = _s3_entries(uri) if uri.startswith("s3://") else _local_entries(Path(uri).expanduser())
    if not entries:
        return None
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


def _local_entries(path: Path) -> list[str]:
    if path.is_file():
        stat = path.stat()
        return [f"{path.name} {stat.st_size} {stat.st_mtime_ns}"]
    if path.is_dir():
        return [f"{p.relative_to(path)} {p.stat().st_size} {p.stat().st_mtime_ns}"
                for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return []


def _s3_entries(uri: str) -> list[str]:
    bucket, key = split_s3(uri)
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    return [f"{o['Key']} {o['Size']} {o.get('ETag', '')}" for page in pages for o in page.get("Contents", [])
            if o["Key"] == key or key.endswith("/") or o["Key"].startswith(key.rstrip("/") + "/")]


@dataclass
class Watch:
    """One (client, task)'s sources and what the watcher knows of them."""

    name: str  # CLIENT/TASK
    sources: tuple[str, ...]
    reported: tuple | None = None  # the states last reported (the baseline at the first poll)
    pending: tuple | None = None  # a new state seen, waiting for one more poll without change
    errors: dict[str, str] = field(default_factory=dict)  # source -> the last listing error said (once)


class DataWatcher:
    """Poll ``watches`` every ``poll_s`` seconds; ``on_change(name, sources)`` once per settled change."""

    def __init__(self, watches: dict[str, Sequence[str]], on_change: Callable[[str, list[str]], None],
                 poll_s: float = 15.0) -> None:
        self.watches = [Watch(name, tuple(sources)) for name, sources in watches.items()]
        self.on_change, self.poll_s = on_change, poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> list[str]:
        """One pass over every watch; returns the names reported this time."""
        fired = []
        for watch in self.watches:
            states = tuple(self._state(watch, uri) for uri in watch.sources)
            if watch.reported is None:
                watch.reported = states
            elif states == watch.reported:
                watch.pending = None  # back to what was reported (a file written back): nothing new
            elif states != watch.pending:
                watch.pending = states  # changed, or still changing: wait for a quiet poll
            else:
                changed = [uri for uri, old, new in zip(watch.sources, watch.reported, states, strict=True)
                           if old != new]
                watch.reported, watch.pending = states, None
                try:
                    self.on_change(watch.name, changed)
                except Exception as err:  # the watcher goes on; the next change is reported again
                    log.warning("could not report new data of %s: %s", watch.name, err)
                fired.append(watch.name)
        return fired

    def _state(self, watch: Watch, uri: str) -> str | None:
        try:
            state = source_state(uri)
        except Exception as err:  # a listing that fails (S3 down, no permission) is not a change
            message = f"{type(err).__name__}: {err}"
            if watch.errors.get(uri) != message:
                log.warning("cannot list %s (data of %s): %s; it is polled again", uri, watch.name, message)
            watch.errors[uri] = message
            previous = watch.pending or watch.reported
            return previous[watch.sources.index(uri)] if previous else None
        watch.errors.pop(uri, None)
        return state

    def run(self) -> None:
        """Poll until :meth:`stop`."""
        while not self._stop.is_set():
            started = time.monotonic()
            self.poll()
            self._stop.wait(max(0.0, self.poll_s - (time.monotonic() - started)))

    def start(self) -> DataWatcher:
        self._thread = threading.Thread(target=self.run, name="prefixflow-data-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)
