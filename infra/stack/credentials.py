"""The stack's secrets, generated once per state folder into ``credentials.json`` (mode 0600) and reused on
every restart:

- ``access_key`` / ``secret_key``: the S3 admin key pair (SeaweedFS's admin identity; the MLflow server's);
- ``mlflow_password`` / ``flask_secret``: the MLflow ``admin`` user's password and the session secret of its
  auth app (used by ``stack up --auth``);
- ``postgres_password``: the password of the stack's PostgreSQL superuser (``database: postgres``);
- ``clients``: per client made by ``stack env --client NAME``, its MLflow password and its S3 key pair.

The file is replaced atomically, so an interrupted write leaves the previous one.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from pathlib import Path

from prefix_core.files import atomic_write

from .config import StackError, credentials_file

ADMIN_USER = "admin"  # the MLflow admin of a stack with --auth


def new_password() -> str:
    """A random password (40 URL-safe characters; MLflow wants at least 12)."""
    return secrets.token_urlsafe(30)


def _read(state_dir: Path) -> dict | None:
    path = credentials_file(state_dir)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StackError(f"cannot read {path}: {err}; restore it from a backup (the services were set up with "
                         "its secrets)") from None
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return data


def load_credentials(state_dir: Path, create: bool) -> dict:
    """Every secret of the stack in ``state_dir`` (see the module docstring); with ``create``, those missing are
    generated and stored, else StackError when there is no file."""
    data = _read(state_dir)
    if data is None and not create:
        raise StackError(f"no credentials in {state_dir}: run `prefixflow stack up` first")
    data = data or {}
    alphabet = string.ascii_uppercase + string.digits
    defaults = {"access_key": lambda: "PF" + "".join(secrets.choice(alphabet) for _ in range(18)),
                "secret_key": lambda: secrets.token_urlsafe(30), "mlflow_password": new_password,
                "flask_secret": lambda: secrets.token_hex(32), "postgres_password": new_password}
    data.setdefault("clients", {})
    missing = [k for k in defaults if k not in data]
    if missing and create:
        data |= {k: defaults[k]() for k in missing}
        atomic_write(credentials_file(state_dir), json.dumps(data, indent=2), mode=0o600)
    return data


def save_client(state_dir: Path, client: str, entry: dict[str, str]) -> None:
    """Store (or replace) one client's secrets."""
    data = load_credentials(state_dir, create=False)
    data["clients"][client] = entry
    atomic_write(credentials_file(state_dir), json.dumps(data, indent=2), mode=0o600)
