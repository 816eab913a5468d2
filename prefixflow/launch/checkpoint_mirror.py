"""Checkpoints in the run's storage: with ``PREFIXFLOW_RUN_STORAGE=s3://BUCKET/PREFIX`` every complete
checkpoint of a run is mirrored to ``s3://BUCKET/PREFIX/CLIENT/TASK/RUN_KEY/checkpoints/step-N/``, so a
retry on another machine (or after the local disk is gone) resumes from it.

Uploads run in the background while training goes on; each step folder's files go first and its
``COMPLETE`` marker last, so a reader never sees a half-uploaded checkpoint as complete. Older remote
checkpoints are pruned to the newest ``keep`` (marker deleted first). Before a launch, the newest
complete remote checkpoint is downloaded if it is newer than the newest local one.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from prefix_core.checkpoint import MARKER, complete_checkpoints
from prefix_core.files import atomic_write_dir
from prefixflow import settings
from prefixflow.services.storage import _s3_call, s3_client, upload_dir

log = logging.getLogger(__name__)


def remote_checkpoints_uri(client: str, task: str, run_key: str) -> str | None:
    root = settings.run_storage()
    if not root:
        return None
    if not root.startswith("s3://"):
        raise ValueError(f"{settings.RUN_STORAGE_ENV} must be an s3://BUCKET/PREFIX URI, got {root!r}")
    return f"{root}/{client}/{task}/{run_key}/checkpoints"


class CheckpointMirror:
    """Mirror of a local checkpoint folder in S3 (see the module docstring)."""

    def __init__(self, local: Path, remote: str, keep: int = 2) -> None:
        self.local, self.keep = Path(local), keep
        self.bucket, _, prefix = remote.removeprefix("s3://").partition("/")
        self.prefix = prefix.rstrip("/")
        self.client = s3_client()
        self.jobs: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def _list(self) -> dict[str, set[str]]:
        """Remote step folders and the file names each holds."""
        out: dict[str, set[str]] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/")
        for page in _s3_call(f"s3://{self.bucket}/{self.prefix}", lambda: list(pages)):
            for obj in page.get("Contents", []):
                step, _, name = obj["Key"][len(self.prefix) + 1 :].partition("/")
                out.setdefault(step, set()).add(name)
        return out

    def restore(self) -> Path | None:
        """Download the newest complete remote checkpoint if it is newer than the local ones."""
        remote = sorted((s for s, names in self._list().items() if MARKER in names), reverse=True)
        local = complete_checkpoints(self.local)
        if not remote or (local and local[0].name >= remote[0]):
            return None
        step = remote[0]
        def download(tmp: Path) -> None:
            for name in sorted(self._list()[step] - {MARKER}):
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                key = f"{self.prefix}/{step}/{name}"
                _s3_call(f"s3://{self.bucket}/{key}", lambda key=key, name=name: self.client.download_file(
                    self.bucket, key, str(tmp / name)))
            (tmp / MARKER).write_text(step)

        target = atomic_write_dir(self.local / step, download)
        log.info("restored checkpoint %s from s3://%s/%s", step, self.bucket, self.prefix)
        return target

    def push(self, step_path: Path) -> None:
        """Queue a complete local checkpoint for upload."""
        self.jobs.put(Path(step_path))

    def on_event(self, event: dict) -> None:
        """A training event listener: each ``checkpoint`` event queues that checkpoint for upload."""
        if event.get("event") == "checkpoint":
            self.push(Path(event["path"]))

    def _upload(self, path: Path) -> None:
        upload_dir(path, f"s3://{self.bucket}/{self.prefix}/{path.name}", last=MARKER)
        listing = self._list()
        for old in sorted(listing, reverse=True)[self.keep :]:
            for name in sorted(listing[old], key=lambda n: n != MARKER):  # the marker goes first
                self.client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{old}/{name}")

    def _work(self) -> None:
        while True:
            path = self.jobs.get()
            if path is None:
                return
            try:
                self._upload(path)
            except Exception as err:  # keep training; the next checkpoint tries again
                self.errors.append(f"{path.name}: {err}")
                log.warning("checkpoint upload of %s failed: %s", path, err)

    def close(self) -> list[str]:
        """Wait for queued uploads; returns the upload errors (empty when all went up)."""
        self.jobs.put(None)
        self.worker.join()
        return self.errors
