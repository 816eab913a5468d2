"""The stack's S3 access key and secret: generated once per state folder into ``credentials.json``
(mode 0600) and reused on every restart."""

from __future__ import annotations

import json
import os
import secrets
import string
from pathlib import Path

from .config import StackError, credentials_file


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def load_credentials(state_dir: Path, create: bool) -> dict[str, str]:
    """``{"access_key", "secret_key"}`` of the stack in ``state_dir``; with ``create``, generated if missing,
    else StackError. A file readable by others is tightened to 0600."""
    path = credentials_file(state_dir)
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
