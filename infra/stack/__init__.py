"""The local server stack: SeaweedFS (S3), an MLflow server and a Prefect server, all on one host, with their
state in one folder (``$PREFIXFLOW_STACK_DIR``, default ``state/stack``; layout in ``config``).

Start order is S3 → MLflow → Prefect, each waited on with an HTTP health check; shutdown is the reverse.
Each service also serves a web UI: the SeaweedFS admin page (admin port), the MLflow UI (at its API address) and
the Prefect UI (its API address without ``/api``). The UIs are addressed by ``StackConfig.ui_host`` (default: the
client host), which the Prefect UI is told as its API URL and the MLflow server accepts as a host name.

Modules: ``config`` (StackConfig, StackError, state folder layout), ``credentials`` (the S3 key pair),
``services`` (each service's command line and env; the client env), ``service_processes`` (pid files, start and
stop of a service's process group), ``health`` (ports, health checks), ``control`` (up/down/status/env) and
``cli`` (``prefixflow stack``, also ``python -m prefixflow.infra.stack``).
"""

from __future__ import annotations

from .cli import app
from .config import GRPC_OFFSET, REGION, SERVICES, StackConfig, StackError, default_state_dir
from .control import running_stack, stack_down, stack_env, stack_status, stack_up
from .services import client_env, find_weed

__all__ = ["GRPC_OFFSET", "REGION", "SERVICES", "StackConfig", "StackError", "app", "client_env",
           "default_state_dir", "find_weed", "running_stack", "stack_down", "stack_env", "stack_status",
           "stack_up"]
