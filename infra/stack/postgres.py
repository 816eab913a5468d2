"""PostgreSQL, the stack's database (``StackConfig.database == "postgres"``): the Prefect server's, the MLflow
server's and MLflow's auth database, one PostgreSQL server on 127.0.0.1 whose data folder is in the stack's folder
(``postgres/data``).

- The binaries come from Debian's ``postgresql`` package (``/usr/lib/postgresql/VERSION/bin``, not on PATH) or
  PATH; missing, the stack refuses with the apt command.
- The server refuses to run as root; as root it runs as the ``postgres`` user (``setpriv``), which owns the data
  folder and must be able to reach it (every folder above it searchable by that user).
- ``initdb`` runs once (superuser ``prefixflow``, password auth with the stack's ``postgres_password``); the
  server listens on TCP on 127.0.0.1 only (no unix socket); the databases ``prefect``, ``mlflow`` and
  ``mlflow_auth`` are created when missing. The password reaches the MLflow and Prefect servers as ``PGPASSWORD``
  (libpq and asyncpg read it), never on a command line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .config import StackConfig, StackError, log_file

USER = "prefixflow"  # the superuser initdb creates; the servers connect as it
DATABASES = ("prefect", "mlflow", "mlflow_auth")
HOST = "127.0.0.1"  # its clients (MLflow, Prefect) run on this machine
OS_USER = "postgres"  # who runs the server when the stack is started by root
APT = "apt-get install -y postgresql"
DEBIAN_ROOT = Path("/usr/lib/postgresql")  # Debian's versioned installs: VERSION/bin/postgres

# Deferred imports: psycopg2 (the MLflow server's PostgreSQL driver) is deferred to ensure_databases.


def bin_dir() -> Path:
    """The folder of ``initdb`` and ``postgres``: the newest ``/usr/lib/postgresql/*/bin``, else PATH's."""
    versions = sorted(DEBIAN_ROOT.glob("*/bin/postgres"),
                      key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.parent.name.split(".")])
    if versions:
        return versions[-1].parent
    found = shutil.which("postgres")
    if found and shutil.which("initdb"):
        return Path(found).parent
    raise StackError(f"PostgreSQL is not installed (no initdb/postgres in /usr/lib/postgresql/*/bin or on PATH), "
                     f"and the stack keeps Prefect and MLflow in it: install it (`{APT}` as root on "
                     "Debian/Ubuntu), or run the stack on SQLite: `prefixflow stack up --database sqlite`")


def data_dir(config: StackConfig) -> Path:
    return config.state_dir / "postgres" / "data"


def as_server_user() -> list[str]:
    """The command prefix that runs a PostgreSQL binary as its user: ``setpriv`` to ``postgres`` as root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        raise StackError("running the stack as root needs `setpriv` (util-linux) to start PostgreSQL as the "
                         "postgres user")
    return ["setpriv", f"--reuid={OS_USER}", f"--regid={OS_USER}", "--init-groups", "--"]


def _owned_by_server_user(folder: Path) -> None:
    """As root: ``folder`` owned by the postgres user, and reachable by it (else StackError with the fix)."""
    if os.geteuid() != 0:
        return
    shutil.chown(folder, OS_USER, OS_USER)
    probe = subprocess.run([*as_server_user(), "test", "-w", str(folder)], capture_output=True)
    if probe.returncode != 0:
        blocked = [str(p) for p in folder.parents if p.exists() and not p.stat().st_mode & 0o001][:3]
        raise StackError(f"PostgreSQL runs as the {OS_USER} user (it refuses root), which cannot reach {folder}: "
                         f"folders above it are closed to other users ({', '.join(blocked) or 'see ls -ld'}). Put "
                         "the stack in a folder it can reach (--state-dir, e.g. /srv/prefixflow-stack), let it "
                         f"through (`chmod o+x {' '.join(blocked) or 'FOLDER'}`), or `--database sqlite`")


def initialise(config: StackConfig, password: str) -> None:
    """``initdb`` the data folder unless it holds a cluster already (``PG_VERSION``)."""
    data = data_dir(config)
    if (data / "PG_VERSION").exists():
        return
    bins = bin_dir()
    data.parent.mkdir(parents=True, exist_ok=True)
    _owned_by_server_user(data.parent)
    if data.exists():  # an initdb that died half-way: start over
        shutil.rmtree(data)
    fd, pwfile = tempfile.mkstemp(dir=data.parent, prefix=".pw-")
    try:
        os.write(fd, password.encode() + b"\n")
        os.close(fd)
        if os.geteuid() == 0:
            shutil.chown(pwfile, OS_USER, OS_USER)
        res = subprocess.run([*as_server_user(), str(bins / "initdb"), "-D", str(data), "-U", USER,
                              "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8"],
                             capture_output=True, text=True)
    finally:
        Path(pwfile).unlink(missing_ok=True)
    if res.returncode != 0:
        raise StackError(f"initdb of {data} failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-2000:]}")


def server_command(config: StackConfig) -> list[str]:
    """The ``postgres`` server in the foreground (the stack tracks its process group)."""
    return [*as_server_user(), str(bin_dir() / "postgres"), "-D", str(data_dir(config)),
            "-p", str(config.postgres_port), "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=",
            "-c", "max_connections=200"]


def url(config: StackConfig, database: str, driver: str = "postgresql+psycopg2") -> str:
    """A connection URL without the password (``PGPASSWORD`` carries it)."""
    return f"{driver}://{USER}@{HOST}:{config.postgres_port}/{database}"


def ready(config: StackConfig) -> bool:
    """The server accepts connections (``pg_isready``)."""
    try:
        res = subprocess.run([str(bin_dir() / "pg_isready"), "-h", HOST, "-p", str(config.postgres_port), "-t",
                              "2"], capture_output=True, timeout=10)
    except (StackError, OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def ensure_databases(config: StackConfig, password: str) -> None:
    """Create the databases of :data:`DATABASES` that do not exist yet."""
    import psycopg2

    last: Exception | None = None
    for _ in range(20):
        try:
            conn = psycopg2.connect(host=HOST, port=config.postgres_port, user=USER, password=password,
                                    dbname="postgres", connect_timeout=5)
            break
        except psycopg2.OperationalError as err:  # up, but still starting
            last = err
            time.sleep(0.5)
    else:
        raise StackError(f"PostgreSQL is up but refuses the stack's connection ({last}); see "
                         f"{log_file(config.state_dir, 'postgres')}")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            have = {row[0] for row in cur.fetchall()}
            for name in DATABASES:
                if name not in have:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
