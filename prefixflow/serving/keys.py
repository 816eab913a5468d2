"""API keys of ``prefixflow serve``: each key belongs to one client, or is an admin key (client ``*``).

Only SHA-256 hashes are kept, in memory and in the keys file; a key is shown once, when ``prefixflow keys add``
creates it, and never logged. Keys come from a YAML file (``--keys FILE``)::

    keys:
      - {client: acme, sha256: 5f1c..., created: "2026-12-03T15:00:00+00:00"}
      - {client: "*", sha256: 09ab...}          # admin: may use every prefix

and/or from the environment (a Kubernetes Secret): ``PREFIXFLOW_API_KEYS="acme=KEY,globex=KEY2,*=ADMINKEY"``,
where each KEY may also be given hashed as ``sha256:HEX``. With no key configured the server is open: every
caller is admin (for a local server on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from prefix_core.errors import PrefixError
from prefix_core.files import atomic_write
from prefixflow import settings

ADMIN = "*"
KEYS_ENV = settings.API_KEYS_ENV
_CLIENT = re.compile(r"^(\*|[a-z0-9][a-z0-9-]*)$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


class KeysError(PrefixError):
    """The keys file or ``PREFIXFLOW_API_KEYS`` cannot be read."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``client`` (``*`` for admin) and ``key_id`` (the first 12 hex digits of the key's hash:
    safe to show, used for rate limits)."""

    client: str
    key_id: str

    @property
    def is_admin(self) -> bool:
        return self.client == ADMIN

    def may_use(self, client: str | None) -> bool:
        return self.is_admin or (client is not None and client == self.client)


class KeyStore:
    """Hash -> client. ``identify(key)`` is a constant-time lookup by hash."""

    def __init__(self, hashes: dict[str, str]) -> None:
        self._hashes = dict(hashes)

    @property
    def is_open(self) -> bool:
        """No key configured: every caller is admin."""
        return not self._hashes

    @property
    def clients(self) -> list[str]:
        return sorted(set(self._hashes.values()))

    def identify(self, key: str | None) -> Caller | None:
        if self.is_open:
            return Caller(ADMIN, "open")
        if not key:
            return None
        digest = hash_key(key)
        for known, client in self._hashes.items():
            if hmac.compare_digest(known, digest):
                return Caller(client, digest[:12])
        return None

    @classmethod
    def load(cls, file: Path | None = None, env: str | None = None) -> KeyStore:
        """Keys from ``file`` (if given) and the ``PREFIXFLOW_API_KEYS`` text ``env`` (default: the variable)."""
        hashes: dict[str, str] = {}
        if file is not None:
            for entry in read_file(file):
                hashes[entry["sha256"]] = entry["client"]
        env = settings.api_keys() if env is None else env
        for i, item in enumerate(p for p in (x.strip() for x in env.split(",")) if p):
            client, sep, key = item.partition("=")
            client, key = client.strip(), key.strip()
            if not sep or not key or not _CLIENT.match(client):
                raise KeysError(f"{KEYS_ENV}: entry {i + 1} is not CLIENT=KEY (write e.g. acme=KEY,*=ADMINKEY; "
                                "CLIENT is a client name or * for admin)")
            digest = key.removeprefix("sha256:") if key.startswith("sha256:") else hash_key(key)
            if not _HEX.match(digest):
                raise KeysError(f"{KEYS_ENV}: entry {i + 1} ({client}) has a sha256: value that is not 64 hex digits")
            hashes[digest] = client
        return cls(hashes)


def read_file(file: Path) -> list[dict]:
    """The entries of a keys file (an empty list for a file that does not exist yet is not allowed here)."""
    file = Path(file)
    if not file.is_file():
        raise KeysError(f"keys file {file} does not exist; create keys with `prefixflow keys add --client NAME "
                        f"--file {file}`")
    try:
        doc = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise KeysError(f"keys file {file} is not valid YAML: {err}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise KeysError(f"keys file {file} must hold a `keys:` list of {{client, sha256}} entries")
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and _CLIENT.match(str(entry.get("client", "")))
                and _HEX.match(str(entry.get("sha256", "")))):
            raise KeysError(f"keys file {file}: entry {i + 1} needs `client` (a client name or \"*\") and `sha256` "
                            "(64 lowercase hex digits)")
    return entries


def add_key(file: Path, client: str) -> tuple[str, str]:
    """Create a key for ``client`` (``*``: admin), append its hash to ``file`` (created if missing; replaced
    atomically) and return ``(key, key_id)``. The key itself is not stored anywhere."""
    if not _CLIENT.match(client):
        raise KeysError(f"client {client!r}: use the client name of the specs (lowercase letters, digits, '-') "
                        "or * for an admin key")
    file = Path(file)
    entries = read_file(file) if file.exists() else []
    key = "pf-" + secrets.token_urlsafe(32)
    digest = hash_key(key)
    entries.append({"client": client, "sha256": digest, "created": datetime.now(UTC).isoformat(timespec="seconds")})
    header = "# prefixflow serve: API keys, stored as SHA-256 hashes (the keys were shown once, at creation)\n"
    atomic_write(file, header + yaml.safe_dump({"keys": entries}, sort_keys=False), mode=0o600)
    return key, digest[:12]
