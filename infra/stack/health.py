"""Is the stack ready: free ports and the ``weed`` binary before a start (``preflight``), each service's HTTP
health endpoint (``health_url``, ``http_ok``), and the wait for a started service to answer
(``wait_healthy``; for S3 also the bucket), which fails with the tail of the service's log."""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import postgres
from .config import REGION, StackConfig, StackError, log_file
from .service_processes import exit_code, service_alive
from .services import find_weed

# Deferred imports: boto3 is deferred to the S3 check.


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port`` (bind test with SO_REUSEADDR, as servers do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """``url`` answers 2xx (never through a proxy: the stack is local)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def health_url(config: StackConfig, name: str) -> str:
    """The health endpoint of service ``name`` (PostgreSQL's: its connection URL)."""
    return {"postgres": config.urls()["postgres"], "s3": f"{config.urls()['s3']}/healthz",
            "mlflow": f"{config.urls()['mlflow']}/health", "prefect": f"{config.urls()['prefect']}/health"}[name]


def healthy(config: StackConfig, name: str) -> bool:
    """Service ``name`` answers its health check (PostgreSQL: accepts connections)."""
    return postgres.ready(config) if name == "postgres" else http_ok(health_url(config, name))


def preflight(config: StackConfig, to_start: list[str]) -> None:
    """Fail before starting anything: weed binary present, every port needed still free."""
    if "s3" in to_start:
        find_weed()
    if "postgres" in to_start:
        postgres.bin_dir()
    for name in to_start:
        host = postgres.HOST if name == "postgres" else config.host
        for port in config.ports()[name]:
            if not port_free(host, port):
                flag = {"postgres": "--postgres-port", "s3": "--s3-port / --weed-*-port", "mlflow": "--mlflow-port",
                        "prefect": "--prefect-port"}[name]
                raise StackError(f"port {port} on {host}, needed by {name}, is already in use by another "
                                 f"program: stop that program, or choose other ports (prefixflow stack up {flag}, "
                                 f"or StackConfig(...) in Python)")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log file)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(log is empty)"


def _ensure_bucket(config: StackConfig, creds: dict[str, str]) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.client("s3", endpoint_url=config.urls()["s3"], region_name=REGION,
                      aws_access_key_id=creds["access_key"], aws_secret_access_key=creds["secret_key"])
    last: Exception | None = None
    for _ in range(20):
        try:
            s3.head_bucket(Bucket=config.bucket)
            return
        except ClientError as err:
            last = err
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                with contextlib.suppress(ClientError):
                    s3.create_bucket(Bucket=config.bucket)
        except BotoCoreError as err:
            last = err
        time.sleep(0.5)
    raise StackError(f"S3 is up but bucket {config.bucket!r} cannot be reached or created ({last}); see "
                     f"{log_file(config.state_dir, 's3')}")


def wait_healthy(config: StackConfig, name: str, pid: int, creds: dict[str, str]) -> None:
    """Wait until service ``name`` (leader ``pid``) answers its health check, and for S3 the bucket exists.
    StackError, with the last lines of its log, if it exits or ``config.start_timeout`` passes first."""
    url = health_url(config, name)
    log_path = log_file(config.state_dir, name)
    deadline = time.monotonic() + config.start_timeout
    while True:
        if not service_alive(pid):
            code = exit_code(pid)
            code_text = f" with code {code}" if code is not None else ""
            raise StackError(f"{name} exited{code_text} during startup. Last lines of {log_path}:\n"
                             f"{_tail(log_path)}\nFix the cause shown above, then run `prefixflow stack up` again.")
        if healthy(config, name):
            break
        if time.monotonic() > deadline:
            raise StackError(f"{name} was not healthy at {url} within {config.start_timeout:.0f} s. Last lines of "
                             f"{log_path}:\n{_tail(log_path)}\nFix the cause shown above (on a slow machine raise "
                             "the start timeout: --timeout / StackConfig.start_timeout), then run "
                             "`prefixflow stack up` again.")
        time.sleep(0.25)
    if name == "s3":
        _ensure_bucket(config, creds)
    elif name == "postgres":
        postgres.ensure_databases(config, creds["postgres_password"])
