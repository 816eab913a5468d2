"""A local-stack config on ports that are free right now, so tests run beside each other and beside a real stack."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

from prefixflow.infra.stack import GRPC_OFFSET, StackConfig, StackError
from prefixflow.infra.stack.health import port_free

_PORT_FIELDS = ("s3_port", "weed_master_port", "weed_volume_port", "weed_filer_port", "weed_admin_port",
                "mlflow_port", "prefect_port", "postgres_port")


def stack_config_with_free_ports(state_dir: Path, **overrides) -> StackConfig:
    """A StackConfig in ``state_dir`` whose ports (and SeaweedFS's port + 10000) are all free right now;
    ``overrides`` are further StackConfig fields (a port given there wins over the chosen one)."""
    host = overrides.get("host", "127.0.0.1")
    rng = random.Random()
    chosen: set[int] = set()
    ports: dict[str, int] = {}
    for name in _PORT_FIELDS:
        weed = name not in ("mlflow_port", "prefect_port", "postgres_port")
        for _ in range(2000):
            port = rng.randrange(20000, 30000)
            need = [port, port + GRPC_OFFSET] if weed else [port]
            if not chosen.intersection(need) and all(port_free(host, p) for p in need):
                chosen.update(need)
                ports[name] = port
                break
        else:
            raise StackError("could not find free ports between 20000 and 40000")
    reachable_by_postgres(Path(state_dir))
    return StackConfig(state_dir=state_dir, **{**ports, **overrides})


def reachable_by_postgres(folder: Path) -> None:
    """As root, PostgreSQL runs as the ``postgres`` user, which cannot search pytest's base folder (pytest keeps
    ``pytest-of-root`` at mode 0700 and resets it at every session start). ``folder`` then becomes a symlink to a
    folder of its own directly in the temp folder (removed when the process exits); the stack resolves the link,
    so PostgreSQL's data lives where that user can reach it."""
    if os.geteuid() != 0 or folder.is_symlink():
        return
    real = Path(tempfile.mkdtemp(prefix="prefixflow-stack-"))
    real.chmod(0o711)
    atexit.register(shutil.rmtree, real, True)
    if folder.exists():
        folder.rmdir()  # an empty folder made for the stack (tmp_path_factory.mktemp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(real, target_is_directory=True)
