"""register_prefix: log the prefix to the pipeline's MLflow run (to S3 when the server's artifact
store is S3), create a registered-model version tagged with where it came from, point ``candidate``
at it, and move ``champion`` (keeping the old one as ``previous``) only when the gate passed.

Idempotent: the version carries the pipeline run key; a retried or rerun registration of the same run
finds it and creates nothing new. Callers that may run at once for one registered model hold its registration
lock (tasks.register_prefix); a version gated against a champion that has moved since is not promoted.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel

from prefixflow.services import canary, registry, tracking
from prefixflow.services.errors import AccessDenied
from prefixflow.services.evaluation import EvalReport
from prefixflow.services.mlflow_flavor import write_mlmodel
from prefixflow.services.preparation import PreparedData
from prefixflow.services.spec import PipelineSpec
from prefixflow.services.trained import TrainOutcome
from prefixflow.services.usage import usage_tags


class Registration(BaseModel):
    name: str
    version: str
    created: bool  # False when this run's version already existed (retry)
    model_uri: str  # models:/NAME/VERSION
    champion: str | None  # champion version after registration
    previous: str | None
    gate_passed: bool
    note: str | None = None  # why a version that passed its gate was not made champion
    canary: str | None = None  # the version that passed and started as @canary (evaluate.gate.canary)


def version_tags(spec: PipelineSpec, data: PreparedData, trained: TrainOutcome, report: EvalReport,
                 run_key: str) -> dict[str, str]:
    manifest = json.loads((Path(trained.artifact_uri) / "manifest.json").read_text())
    base = manifest.get("base_model", {})
    tags = {
        tracking.RUN_KEY_TAG: run_key, "client": spec.client, "task": spec.task,
        "base_model": str(base.get("name")), "base_fingerprint": str(base.get("fingerprint")),
        "data_fingerprint": data.fingerprint, "spec_hash": spec.spec_hash(), "training_hash": spec.training_hash(),
        "num_virtual_tokens": str(manifest.get("num_virtual_tokens")),
        "gate": "passed" if report.gate.passed else "refused", "gate_reason": report.gate.reason,
    }
    for system, ms in report.metrics.items():
        tags.update({f"{system}.{m}": f"{v:.4f}" for m, v in ms.items()})
    for system, ms in (report.warm_start_test or {}).get("metrics", {}).items():  # on the started-from test set
        tags.update({f"warm_start.test.{system}.{m}": f"{v:.4f}" for m, v in ms.items()})
    if trained.usage:
        tags.update(usage_tags(trained.usage, with_figures=True))
    warm = trained.warm_start or {}
    if warm.get("cold"):
        tags["warm_start.cold"] = warm["cold"]
    elif warm.get("version"):
        tags["warm_start.from"] = f"{warm['name']} v{warm['version']}"
        if warm.get("step0_eval_loss") is not None:
            tags["warm_start.step0_eval_loss"] = f"{warm['step0_eval_loss']:.6f}"
    return tags


def register(spec: PipelineSpec, data: PreparedData, trained: TrainOutcome, report: EvalReport, run_key: str,
             mlflow_run_id: str, extra_tags: dict[str, str] | None = None) -> Registration:
    """Register the run's prefix (``extra_tags``: more version tags, e.g. the sweep it won)."""
    name = spec.registered_model
    ensure_model(name, spec.client, spec.task, f"Prefixes for {spec.client}/{spec.task} on {spec.base_model}")
    existing = registry.versions_for_run(name, run_key)
    if existing:
        mv, created = existing[0], False
    else:
        mv = publish(name, Path(trained.artifact_uri), mlflow_run_id,
                     {**version_tags(spec, data, trained, report, run_key), **(extra_tags or {})},
                     report.gate.reason)
        created = True
    tracking.client().set_registered_model_alias(name, "candidate", mv.version)
    note = started = None
    if report.gate.passed:
        current = registry.alias_version(name, "champion")
        gate_canary = spec.evaluate.gate.canary
        if current in (report.champion_version, str(mv.version)):
            if gate_canary is not None and current not in (None, str(mv.version)):
                started = canary.start(name, str(mv.version), gate_canary.share, gate_canary.min_requests).version
                note = (f"v{mv.version} passed its gate and starts as @canary with {gate_canary.share:g}% of the "
                        f"requests naming @champion (v{current}); a server makes it @champion after "
                        f"{gate_canary.min_requests} of them if it fails no more often; `prefixflow promote "
                        f"{spec.client}/{spec.task} --finish` or `prefixflow rollback {spec.client}/{spec.task}` "
                        "ends it sooner")
            else:
                registry.promote(name, mv.version)
        else:  # another run of this client/task made a champion since this one was evaluated
            note = (f"@champion moved to v{current} while this run was evaluated against "
                    f"{'v' + report.champion_version if report.champion_version else 'no champion'} (another run of "
                    f"{spec.client}/{spec.task}), so v{mv.version} stays @candidate: compare them and "
                    f"`prefixflow promote {spec.client}/{spec.task}/{mv.version}` if it should serve")
    return Registration(name=name, version=str(mv.version), created=created,
                        model_uri=f"models:/{name}/{mv.version}", champion=registry.alias_version(name, "champion"),
                        previous=registry.alias_version(name, "previous"), gate_passed=report.gate.passed, note=note,
                        canary=started)


def ensure_model(name: str, client: str, task: str, description: str) -> None:
    """Create the registered model ``name`` tagged with its client and task, unless it exists."""
    try:
        if registry.registered_model(name) is not None:
            return
    except AccessDenied:  # with auth, a model that does not exist reads as denied: creating it says whose it is
        pass
    try:
        tracking.client().create_registered_model(name, tags={"client": client, "task": task},
                                                  description=description)
    except Exception:
        if registry.registered_model(name) is None:  # else created concurrently: fine
            raise


def publish(name: str, prefix_dir: Path, mlflow_run_id: str, tags: dict[str, str], description: str = ""):
    """Log a prefix folder to the run's ``prefix`` artifacts with the pyfunc ``MLmodel`` file (so
    ``mlflow.pyfunc.load_model`` loads the version) and create a version of ``name`` from it. A partial upload
    of an earlier attempt is completed, not trusted. Returns the ModelVersion."""
    c = tracking.client()
    with tempfile.TemporaryDirectory(prefix="prefixflow-publish-") as tmp:
        staged = Path(tmp) / "prefix"
        shutil.copytree(prefix_dir, staged)
        write_mlmodel(staged)
        uploaded = {Path(f.path).name for f in c.list_artifacts(mlflow_run_id, "prefix")}
        if not {f.name for f in staged.iterdir()} <= uploaded:
            c.log_artifacts(mlflow_run_id, str(staged), "prefix")
    return c.create_model_version(name, source=f"runs:/{mlflow_run_id}/prefix", run_id=mlflow_run_id, tags=tags,
                                  description=description)


class Unchanged(BaseModel):
    """Why a run did not train: the champion already is what it would train."""

    name: str
    version: str
    reason: str


def unchanged_champion(spec: PipelineSpec, data: PreparedData) -> Unchanged | None:
    """The champion, when its data fingerprint and training hash (base model, data, prefix and training
    settings) equal this run's; None when anything differs or there is no champion."""
    champion = registry.aliased(spec.registered_model, "champion")
    if champion is None:
        return None
    tags = champion.tags
    if tags.get("data_fingerprint") != data.fingerprint or tags.get("training_hash") != spec.training_hash():
        return None
    return Unchanged(name=spec.registered_model, version=str(champion.version), reason=(
        f"the data (fingerprint {data.fingerprint[:12]}), the base model {spec.base_model!r} and the training "
        f"settings equal those of champion v{champion.version}: nothing to retrain (set retrain: always, or "
        "--retrain always, to train anyway)"))
