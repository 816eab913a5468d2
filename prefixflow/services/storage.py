"""Where the pipeline keeps things, and reading/writing local paths or ``s3://`` URIs.

Everything local lives under one state folder, ``$PREFIXFLOW_HOME`` (default ``./state``):
``data/`` (prepared data, cached by content), ``runs/`` (one folder per pipeline run: training job,
logs, checkpoints, the prefix), ``mlflow/`` (the embedded MLflow store when no server is configured)
and ``prefect/`` (the embedded Prefect home). S3 access goes through boto3, which reads the endpoint
and credentials from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from prefix_core.files import replacing
from prefixflow import settings
from prefixflow.services import boundary
from prefixflow.services.errors import DataError

# Deferred imports: boto3 is deferred to the S3 calls: most runs read local files.


def home() -> Path:
    """The state folder (created on demand), as an absolute path."""
    path = settings.state_folder()
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir(client: str, task: str, run_key: str) -> Path:
    return home() / "runs" / client / task / run_key


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise DataError(f"{uri!r} is not a full S3 object URI: expected s3://BUCKET/KEY")
    return bucket, key


def s3_client():
    """A client from a fresh session: endpoint and credentials are read from the environment now
    (boto3's default session would keep the first credentials it saw)."""
    import boto3

    return boto3.session.Session().client("s3")


def _s3_call(uri: str, fn):
    """``fn()``, a boto3 call on ``uri``, with its exceptions mapped to the error model (boundary.s3_calls)."""
    with boundary.s3_calls(uri):
        return fn()


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def source_fingerprint(uri: str) -> str:
    """A cheap identity of a data source's content: sha256 of local bytes, or the S3 ETag and size."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        head = _s3_call(uri, lambda: s3_client().head_object(Bucket=bucket, Key=key))
        return hashlib.sha256(f"{uri}|{head['ETag']}|{head['ContentLength']}".encode()).hexdigest()
    path = Path(uri)
    if path.exists():
        return file_fingerprint(path)
    return hashlib.sha256(f"name:{uri}".encode()).hexdigest()  # a datasets name: identified by the name


def fetch(uri: str) -> Path:
    """A local path for ``uri``: local paths as they are, S3 objects downloaded once into the state
    folder's download cache (keyed by ETag)."""
    if not is_s3(uri):
        return Path(uri)
    bucket, key = split_s3(uri)
    target = home() / "downloads" / source_fingerprint(uri)[:16] / Path(key).name
    if not target.exists():
        with replacing(target) as tmp:
            _s3_call(uri, lambda: s3_client().download_file(bucket, key, str(tmp)))
    return target


def fetch_dir(uri: str) -> Path:
    """A local folder for ``uri``: local paths as they are; ``s3://BUCKET/PREFIX`` downloaded (every
    object under the prefix) into a new temporary folder."""

    if not is_s3(uri):
        return Path(uri)
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/"
    client = s3_client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [o["Key"] for page in _s3_call(uri, lambda: list(pages)) for o in page.get("Contents", [])]
    if not keys:
        raise DataError(f"nothing under {uri}; check the bucket and prefix")
    target = Path(tempfile.mkdtemp(prefix="prefixflow-s3-"))
    for key in keys:
        dest = target / key[len(prefix) :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        _s3_call(uri, lambda key=key, dest=dest: client.download_file(bucket, key, str(dest)))
    return target


def upload_dir(local: Path, uri: str, last: str | None = None) -> list[str]:
    """Upload every file under ``local`` to ``s3://BUCKET/PREFIX/...``; the top-level file named ``last``
    (a completion marker) goes up after all the others. Returns the object keys."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client, keys = s3_client(), []
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for f in sorted(files, key=lambda p: p == local / last if last else False):
        key = f"{prefix.rstrip('/')}/{f.relative_to(local).as_posix()}".lstrip("/")
        _s3_call(uri, lambda f=f, key=key: client.upload_file(str(f), bucket, key))
        keys.append(key)
    return keys
