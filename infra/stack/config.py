"""The stack's settings (``StackConfig``: state folder, bind address, ports, bucket, UI host), its errors
(``StackError``) and the layout of its state folder.

Everything lives under one state folder (``$PREFIXFLOW_STACK_DIR``, default ``state/stack``)::

    config.json        the StackConfig last used (ports, bucket): ``status``/``env``/``down`` read it
    credentials.json   generated secrets (mode 0600, reused on restart): the S3 admin key pair, the MLflow admin
                       password, and each client's (``credentials``)
    postgres/data      the PostgreSQL cluster (``database: postgres``, the default): databases prefect, mlflow,
                       mlflow_auth (infra.stack.postgres)
    s3/                SeaweedFS data (``weed mini -dir``)
    mlflow/            the MLflow server's folder; ``database: sqlite``: mlflow.db (tracking + registry) and,
                       with ``auth``, auth.db (basic_auth.ini beside it); artifacts go to s3://BUCKET/mlflow
    prefect/           PREFECT_HOME of the server (``database: sqlite``: prefect.db)
    logs/NAME.log      each service's stdout + stderr
    run/NAME.pid       pid of each service (the leader of its own process group)
    .lock              held by ``up``/``down`` (one at a time per folder)
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from prefixflow import settings

SERVICES = ("postgres", "s3", "mlflow", "prefect")  # start order; shutdown is the reverse
DATABASES = ("postgres", "sqlite")  # what the Prefect and MLflow servers keep their data in
GRPC_OFFSET = 10000  # SeaweedFS serves gRPC on each HTTP port + 10000
REGION = "us-east-1"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")  # a DNS name or an IPv4 address


class StackError(RuntimeError):
    """The stack cannot start, stop or be found; the message says what to do."""


def default_state_dir() -> Path:
    """``$PREFIXFLOW_STACK_DIR`` or ``state/stack``."""
    return settings.stack_dir()


@dataclass
class StackConfig:
    """Where the stack keeps its state, the address it binds to and its ports.

    SeaweedFS also listens on each of its HTTP ports + 10000 (gRPC): s3, master, volume, filer and admin.
    ``ui_host`` is the host name browsers use for the UIs ("" = the client host); set it when the UIs are
    reached from another machine (with ``host`` binding to an address that machine can reach). ``database``:
    ``postgres`` (a PostgreSQL server of the stack on 127.0.0.1, ``postgres_port``) or ``sqlite`` (files; a stack
    made before PostgreSQL came keeps it).
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
    auth: bool = False  # MLflow basic auth and one S3 identity per client (``stack env --client``)
    database: str = "postgres"
    postgres_port: int = 15432

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().resolve()
        if self.database not in DATABASES:
            raise StackError(f"database {self.database!r} is not one of {', '.join(DATABASES)}")
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

    def services(self) -> tuple[str, ...]:
        """The services of this stack, in start order."""
        return SERVICES if self.database == "postgres" else SERVICES[1:]

    def ports(self) -> dict[str, list[int]]:
        """Every TCP port each service listens on (PostgreSQL's on 127.0.0.1 whatever ``host`` is)."""
        weed = [self.s3_port, self.weed_master_port, self.weed_volume_port, self.weed_filer_port,
                self.weed_admin_port]
        ports = {"s3": [p + off for p in weed for off in (0, GRPC_OFFSET)],
                 "mlflow": [self.mlflow_port], "prefect": [self.prefect_port]}
        return {"postgres": [self.postgres_port], **ports} if self.database == "postgres" else ports

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
        return {"postgres": f"postgresql://127.0.0.1:{self.postgres_port}", "s3": f"http://{h}:{self.s3_port}",
                "mlflow": f"http://{h}:{self.mlflow_port}", "prefect": f"http://{h}:{self.prefect_port}/api"}

    def ui_urls(self) -> dict[str, str]:
        """The address of each service's web UI: SeaweedFS admin, MLflow, Prefect (whose API is at ``/api``)."""
        h = self.ui_hostname
        return {"postgres": "-", "s3": f"http://{h}:{self.weed_admin_port}", "mlflow": f"http://{h}:{self.mlflow_port}",
                "prefect": f"http://{h}:{self.prefect_port}"}

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["state_dir"] = str(self.state_dir)
        return json.dumps(data, indent=2)

    @classmethod
    def load(cls, state_dir: Path) -> StackConfig:
        """The config stored in ``state_dir`` (its own path wins over the stored one)."""
        path = config_file(state_dir)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise StackError(f"no stack in {state_dir} (no config.json): run `prefixflow stack up` first") from None
        except (OSError, ValueError) as err:
            raise StackError(f"cannot read {path}: {err}; delete it and run `prefixflow stack up`") from None
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data.setdefault("database", "sqlite")  # made before the stack had PostgreSQL: its data is in SQLite
        data["state_dir"] = Path(state_dir)
        return cls(**data)


# ---------------------------------------------------------------- files in the state folder


def config_file(state_dir: Path) -> Path:
    return Path(state_dir) / "config.json"


def credentials_file(state_dir: Path) -> Path:
    return Path(state_dir) / "credentials.json"


def lock_file(state_dir: Path) -> Path:
    return Path(state_dir) / ".lock"


def pid_file(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / "run" / f"{name}.pid"


def log_file(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / "logs" / f"{name}.log"
