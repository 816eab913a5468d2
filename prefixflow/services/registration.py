"""register_prefix: log the prefix to the pipeline's MLflow run (to S3 when the server's artifact
store is S3), create a registered-model version tagged with where it came from, point ``candidate``
at it, and move ``champion`` (keeping the old one as ``previous``) only when the gate passed.

Idempotent: the version carries the pipeline run key; a retried or rerun registration of the same run
finds it and creates nothing new.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from prefixflow.services import registry, tracking
from prefixflow.services.evaluation import EvalReport
from prefixflow.services.preparation import PreparedData
from prefixflow.services.spec import PipelineSpec
from prefixflow.services.trained import TrainOutcome


class Registration(BaseModel):
    name: str
    version: str
    created: bool  # False when this run's version already existed (retry)
    model_uri: str  # models:/NAME/VERSION
    champion: str | None  # champion version after registration
    previous: str | None
    gate_passed: bool


def version_tags(spec: PipelineSpec, data: PreparedData, trained: TrainOutcome, report: EvalReport,
                 run_key: str) -> dict[str, str]:
    manifest = json.loads((Path(trained.artifact_uri) / "manifest.json").read_text())
    base = manifest.get("base_model", {})
    tags = {
        tracking.RUN_KEY_TAG: run_key, "client": spec.client, "task": spec.task,
        "base_model": str(base.get("name")), "base_fingerprint": str(base.get("fingerprint")),
        "data_fingerprint": data.fingerprint, "spec_hash": spec.spec_hash(),
        "num_virtual_tokens": str(manifest.get("num_virtual_tokens")),
        "gate": "passed" if report.gate.passed else "refused", "gate_reason": report.gate.reason,
    }
    for system, ms in report.metrics.items():
        tags.update({f"{system}.{m}": f"{v:.4f}" for m, v in ms.items()})
    return tags


def register(spec: PipelineSpec, data: PreparedData, trained: TrainOutcome, report: EvalReport, run_key: str,
             mlflow_run_id: str) -> Registration:
    from mlflow.exceptions import MlflowException

    c, name = tracking.client(), spec.registered_model
    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name, tags={"client": spec.client, "task": spec.task},
                                      description=f"Prefixes for {spec.client}/{spec.task} on {spec.base_model}")
        except MlflowException:
            c.get_registered_model(name)  # created concurrently: fine
    existing = registry.versions_for_run(name, run_key)
    if existing:
        mv, created = existing[0], False
    else:
        if not c.list_artifacts(mlflow_run_id, "prefix"):
            c.log_artifacts(mlflow_run_id, trained.artifact_uri, "prefix")
        mv = c.create_model_version(name, source=f"runs:/{mlflow_run_id}/prefix", run_id=mlflow_run_id,
                                    tags=version_tags(spec, data, trained, report, run_key),
                                    description=report.gate.reason)
        created = True
    c.set_registered_model_alias(name, "candidate", mv.version)
    if report.gate.passed:
        registry.promote(name, mv.version)
    return Registration(name=name, version=str(mv.version), created=created,
                        model_uri=f"models:/{name}/{mv.version}", champion=registry.alias_version(name, "champion"),
                        previous=registry.alias_version(name, "previous"), gate_passed=report.gate.passed)
