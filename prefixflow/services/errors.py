"""The error model: two roots, so that every layer decides by type alone.

* :class:`InputError` (``prefix_core.PrefixError``): caused by the input (a spec, data, an artifact, a registry
  reference, credentials). Retrying cannot help: tasks never retry it, the CLI prints its message (which says what
  is wrong and how to fix it) and exits 2.
* :class:`Unavailable`: a service the pipeline needs did not answer or failed (S3, MLflow, Prefect). Not the
  input's fault: tasks retry it with backoff; the CLI names the service and exits 1 with the command that
  finishes the run.

Third-party exceptions (MLflow, boto3, httpx) become one of these where they are raised, in
:mod:`prefixflow.services.boundary`. Classifying an error never does I/O: probing a server or the disk is a health
check the caller runs explicitly (:mod:`prefixflow.services.health`).
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator

from prefix_core.errors import PrefixError
from prefixflow import settings

InputError = PrefixError  # the root of errors caused by the input; prefix_core's errors are all of this kind


class DataError(InputError):
    """The task's data cannot be used: missing, unreadable, wrong columns or types, empty."""


class RegistryError(InputError):
    """A registry reference (models:/NAME@ALIAS, CLIENT/TASK@ALIAS, a version) does not resolve."""


class TrainingError(InputError):
    """The training launch failed because of its input (not worth retrying)."""


class AccessDenied(InputError):
    """The credentials in use may not do this (S3 AccessDenied, MLflow 401/403): retrying cannot help."""


class Unavailable(Exception):
    """A service the pipeline needs did not answer or failed: retry later. The message names the service and what
    to check."""


class ServiceUnreachable(Unavailable, ConnectionError):
    """A server (S3, MLflow, Prefect) did not accept a connection or did not answer in time."""


class ServiceFailed(Unavailable):
    """A server (Prefect) accepted the connection but answered 5xx, after its client's retries: it is up but cannot
    serve, most often because its database is down."""


class ArtifactStoreFailed(Unavailable):
    """The MLflow server answered 5xx to an artifact upload or download: it proxies them to its artifact store
    (S3 on the stack), which is the usual cause. :func:`prefixflow.services.health.artifact_store_cause` says
    which."""


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_user_error(exc: BaseException) -> bool:
    """True for errors caused by the input (retrying cannot help)."""
    return isinstance(exc, InputError)


def unavailable(exc: BaseException) -> Unavailable | None:
    """The :class:`Unavailable` in ``exc``'s cause chain (a task failure wraps it), or None."""
    return next((e for e in chain(exc) if isinstance(e, Unavailable)), None)


def disk_full(exc: BaseException) -> str | None:
    """The full-disk sentence when ``exc`` or one of its causes is ENOSPC (or SQLite's SQLITE_FULL), else None."""
    for e in chain(exc):
        full_db = isinstance(e, sqlite3.Error) and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or full_db:
            where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
            return f"no space left on the device{where}: free space there (the state folder is " \
                   f"{settings.state_folder()})"
    return None


def outage(exc: BaseException) -> str | None:
    """One sentence naming the service that failed, or the full disk, when ``exc`` or one of its causes is such a
    failure; None otherwise. No I/O: a failure that carries no such cause is for a health check to explain."""
    found = unavailable(exc)
    return str(found) if found is not None else disk_full(exc)
