"""The MLflow server's ``authorization_function`` under ``prefixflow stack up --auth``: MLflow's basic auth,
plus one rule that ties names to clients.

MLflow's basic-auth app (``--app-name basic-auth``, ``default_permission = NO_PERMISSIONS``) already lets a
user see only what it created or was granted. What it does not check is the *name* of what a user creates:
client ``globex`` could create the registered model ``acme-e2e`` before ``acme`` does, and a server resolving
``acme/e2e@champion`` would then serve globex's prefix to acme's users. So a user that is not an admin may
create (or rename to) only its own names, those of ``prefixflow.services.spec``:

- the experiment ``prefixflow-USER``;
- registered models ``USER-TASK``.

Anything else is answered 403 with the reason, in MLflow's JSON error shape. This module is imported by the
MLflow server process (``MLFLOW_AUTH_CONFIG_PATH`` names it); clients never import it.
"""

from __future__ import annotations

import json
import re

from prefixflow.services.spec import NAME_PATTERN, experiment_name, registered_model_name

# Deferred imports: flask and mlflow.server.auth are deferred: this module is loaded by the MLflow server, whose auth
# app must be set up first.

_CREATES = {  # REST path suffix -> (what is created, the body field naming it)
    "/mlflow/experiments/create": ("experiment", "name"),
    "/mlflow/registered-models/create": ("registered model", "name"),
    "/mlflow/registered-models/rename": ("registered model", "new_name"),
}


def name_refusal(user: str, kind: str, name: str) -> str | None:
    """Why ``user`` may not create the ``kind`` named ``name``; None when it may."""
    if kind == "experiment":
        own = experiment_name(user)
        if name != own:
            return f"user {user!r} may create only its own experiment {own!r}, not {name!r}"
        return None
    head = registered_model_name(user, "")
    task = name[len(head):] if name.startswith(head) else ""
    if not re.match(NAME_PATTERN, task):
        return (f"user {user!r} may create only registered models named {head}TASK (its own client's), "
                f"not {name!r}")
    return None


def _created(request) -> tuple[str, str] | None:
    """(kind, name) when ``request`` creates or renames an experiment or registered model, else None."""
    if request.method != "POST":
        return None
    for suffix, (kind, field) in _CREATES.items():
        if request.path.endswith(suffix):
            body = request.get_json(silent=True) or {}
            return kind, str(body.get(field, ""))
    return None


def authenticate():
    """MLflow's basic auth, then the name rule above for users that are not admins."""
    from flask import Response, request
    from mlflow.server.auth import authenticate_request_basic_auth, store

    result = authenticate_request_basic_auth()
    if isinstance(result, Response):
        return result
    created = _created(request)
    if created is None or store.get_user(result.username).is_admin:
        return result
    reason = name_refusal(result.username, *created)
    if reason is None:
        return result
    body = {"error_code": "PERMISSION_DENIED", "message": f"Permission denied: {reason}"}
    return Response(json.dumps(body), status=403, mimetype="application/json")
