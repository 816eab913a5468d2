"""A local-stack config on ports that are free right now, so tests run beside each other and beside a real stack."""

from __future__ import annotations

import os
import random
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
    """As root, let other users (PostgreSQL runs as ``postgres``) search the test folders above ``folder``
    (pytest makes its base folder 0700); nothing outside the temp folder is touched."""
    if os.geteuid() != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.gettempdir()).resolve()
    for path in [folder.resolve(), *folder.resolve().parents]:
        if top not in path.parents:
            break
        path.chmod(path.stat().st_mode | 0o001)
