"""MLflow: which server (or the embedded store), one experiment per client, one run per pipeline run.

With ``MLFLOW_TRACKING_URI`` set (e.g. by ``prefixflow stack env``) everything goes to that server,
whose artifact store may be S3. Without it, an embedded store under the state folder is used:
``$PREFIXFLOW_HOME/mlflow/mlflow.db`` (SQLite, tracking and registry) and ``mlflow/artifacts/``.
"""

from __future__ import annotations

import logging
import time

from prefixflow import settings
from prefixflow.services import boundary
from prefixflow.services.storage import home

# Deferred imports: mlflow is deferred to the calls: the CLI imports this module.

RUN_KEY_TAG = "prefixflow.run_key"


def tracking_uri() -> str:
    uri = settings.mlflow_tracking_uri()
    if uri:
        return uri
    folder = home() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def is_embedded() -> bool:
    return settings.mlflow_tracking_uri() is None


def client():
    """An MlflowClient for the configured tracking server and registry, behind the error model's adapter
    (:func:`prefixflow.services.boundary.guarded_client`)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # SQLite migrations on first use
    settings.apply_process_defaults()  # no artifact progress bars in task logs; bounded HTTP retries
    # the URI is passed explicitly: mlflow.set_tracking_uri() would export MLFLOW_TRACKING_URI
    return boundary.guarded_client(tracking_uri())


def ensure_experiment(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (home() / "mlflow" / "artifacts").as_uri() if is_embedded() else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another flow of the same client
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(experiment_id: str, run_key: str):
    runs = client().search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1)
    return runs[0] if runs else None


def open_run(experiment: str, run_key: str, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str:
    """The MLflow run of pipeline run ``run_key``: found by tag if a retry already created it."""
    from mlflow.entities import Param

    exp_id = ensure_experiment(experiment)
    existing = find_run(exp_id, run_key)
    if existing is not None:
        return existing.info.run_id
    c = client()
    run = c.create_run(exp_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **tags})
    c.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run.info.run_id


def log_params(run_id: str, params: dict[str, str], logger=None) -> None:
    """Log run params (idempotent for equal values). A value that differs from one logged earlier in the
    same run (a retry resumed on other hardware) keeps the first and is reported as a warning."""
    from mlflow.entities import Param

    values = {k: str(v)[:6000] for k, v in params.items()}
    c = client()
    logged = c.get_run(run_id).data.params
    changed = sorted(k for k, v in values.items() if k in logged and logged[k] != v)
    if changed:
        (logger or logging.getLogger(__name__)).warning(
            "MLflow params kept their first values: %s", ", ".join(f"{k}={logged[k]!r} (now {values[k]!r})"
                                                                   for k in changed))
    new = [Param(k, v) for k, v in values.items() if k not in logged]
    if new:
        c.log_batch(run_id, params=new)


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None])


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client().log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def run_link(run_id: str) -> str:
    """A link to the run in the MLflow UI (or the embedded store's path)."""
    uri = tracking_uri()
    if uri.startswith("http"):
        run = client().get_run(run_id)
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"{uri} (run {run_id}; browse with `mlflow ui --backend-store-uri {uri}`)"


def flatten(prefix: str, obj) -> dict[str, str]:
    """``{"train.max_steps": "300", ...}`` from nested dicts, for run params."""
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: str(obj)}


def close_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)
