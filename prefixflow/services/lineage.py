"""Data lineage in MLflow: the data a pipeline run trained, validated and tested on, as MLflow dataset inputs of
its run (what ``mlflow.log_input`` logs), so MLflow's UI shows them on the run's page and on the registered
version's source run.

One input per split, each with MLflow's context tag (``training``, ``validation``, ``testing``): the name
``CLIENT/TASK:SPLIT``, the source (the spec's data URI; the test split's own ``data.test_source`` where given), the
digest (the first 12 hex digits of the prepared data's fingerprint, as the logs print it; the whole fingerprint is
in the profile), the schema (the two text columns read) and a profile with the split's rows and what preparation
dropped.
"""

from __future__ import annotations

import json

from prefixflow.services.preparation import SPLITS, PreparedData
from prefixflow.services.spec import PipelineSpec

# Deferred imports: mlflow is deferred to the calls: the CLI imports the services.

CONTEXTS = {"train": "training", "validation": "validation", "test": "testing"}  # MLflow's context tag values
CONTEXT_TAG = "mlflow.data.context"
DIGEST_CHARS = 12


def source_of(spec: PipelineSpec, split: str) -> str:
    """The URI the rows of ``split`` were read from."""
    return spec.data.test_source if split == "test" and spec.data.test_source else spec.data.source


def dataset_inputs(spec: PipelineSpec, data: PreparedData) -> list:
    """The ``mlflow.entities.DatasetInput`` of each split (see the module docstring)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema

    schema = Schema([ColSpec("string", spec.data.source_column), ColSpec("string", spec.data.target_column)])
    inputs = []
    for split in SPLITS:
        uri = source_of(spec, split)
        profile = {"num_rows": data.counts.get(split, 0), "fingerprint": data.fingerprint,
                   "rows_read": data.counts.get("read", 0), "rejected": data.counts.get("rejected", 0),
                   "duplicates": data.counts.get("duplicates", 0)}
        dataset = Dataset(name=f"{spec.client}/{spec.task}:{split}", digest=data.fingerprint[:DIGEST_CHARS],
                          source_type="s3" if uri.startswith("s3://") else "local", source=json.dumps({"uri": uri}),
                          schema=json.dumps({"mlflow_colspec": schema.to_dict()}), profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, CONTEXTS[split])]))
    return inputs


def log_data(run_id: str, spec: PipelineSpec, data: PreparedData) -> None:
    """Log the run's data as its dataset inputs (once per run: the run's opening calls it)."""
    from prefixflow.services import tracking

    tracking.client().log_inputs(run_id, datasets=dataset_inputs(spec, data))


def logged_data(run_id: str) -> dict[str, dict]:
    """The dataset inputs of a run, by context: name, digest, source URI, rows."""
    from prefixflow.services import tracking

    run = tracking.client().get_run(run_id)
    found = {}
    for item in run.inputs.dataset_inputs:
        context = next((t.value for t in item.tags if t.key == CONTEXT_TAG), None)
        d = item.dataset
        found[context] = {"name": d.name, "digest": d.digest, "source": json.loads(d.source)["uri"],
                          "rows": json.loads(d.profile or "{}").get("num_rows")}
    return found
