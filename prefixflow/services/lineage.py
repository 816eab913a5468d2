"""Data lineage in MLflow: the data a pipeline run trained, validated and tested on, as MLflow dataset inputs of
its run (what ``mlflow.log_input`` logs), so MLflow's UI shows them on the run's page and on the registered
version's source run.

One input per split, each with MLflow's context tag (``training``, ``validation``, ``testing``): the name
``CLIENT/TASK:SPLIT``, the source (the spec's data URI; the test split's own ``data.test_source`` where given), the
digest (the first 12 hex digits of the prepared data's fingerprint, as the logs print it; the whole fingerprint is
in the profile), the schema (the two text columns read) and a profile with the split's rows and what preparation
dropped.

The rows themselves: a 16-hex-digit digest of each prepared row (all splits) in the run artifact
``lineage/rows.txt.gz``, so a later run can tell which rows were removed since (a warm start needs to), and the
test split itself (``lineage/test.jsonl.gz``), on which a run warm-started from this one is also scored.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tempfile
from pathlib import Path

from prefixflow.services import boundary
from prefixflow.services.preparation import SPLITS, PreparedData, read_split
from prefixflow.services.spec import PipelineSpec

# Deferred imports: mlflow is deferred to the calls: the CLI imports the services.

CONTEXTS = {"train": "training", "validation": "validation", "test": "testing"}  # MLflow's context tag values
CONTEXT_TAG = "mlflow.data.context"
DIGEST_CHARS = 12
ROWS_ARTIFACT = "lineage/rows.txt.gz"
TEST_ARTIFACT = "lineage/test.jsonl.gz"


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
    log_rows(run_id, data)


def logged_data(run_id: str) -> dict[str, dict]:
    """The dataset inputs of a run, by context: name, digest, source URI, rows."""
    from prefixflow.services import tracking

    run = tracking.client().get_run(run_id)
    found = {}
    for item in run.inputs.dataset_inputs:
        context = next((t.value for t in item.tags if t.key == CONTEXT_TAG), None)
        d = item.dataset
        if context not in CONTEXTS.values():
            continue
        found[context] = {"name": d.name, "digest": d.digest, "source": json.loads(d.source)["uri"],
                          "rows": json.loads(d.profile or "{}").get("num_rows")}
    return found


def row_digests(data: PreparedData) -> set[str]:
    """A 16-hex-digit digest of every prepared row (all splits)."""
    return {hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16]
            for split in SPLITS if (Path(data.uri) / f"{split}.jsonl").exists() for row in read_split(data.uri, split)}


def log_rows(run_id: str, data: PreparedData) -> None:
    """Log the row digests of the run's data (``lineage/rows.txt.gz``) and its test split
    (``lineage/test.jsonl.gz``)."""
    _log_gz(run_id, ROWS_ARTIFACT, "\n".join(sorted(row_digests(data))))
    test = read_split(data.uri, "test") if (Path(data.uri) / "test.jsonl").exists() else []
    _log_gz(run_id, TEST_ARTIFACT, "".join(json.dumps(row, sort_keys=True) + "\n" for row in test))


def logged_rows(run_id: str) -> set[str] | None:
    """The row digests a run logged, or None when it logged none (it predates the record)."""
    text = _logged_gz(run_id, ROWS_ARTIFACT)
    return None if text is None else set(filter(None, text.split("\n")))


def logged_test_split(run_id: str) -> list[dict] | None:
    """The test rows (``source``, ``target``) a run logged, or None when it logged none."""
    text = _logged_gz(run_id, TEST_ARTIFACT)
    return None if text is None else [json.loads(line) for line in text.splitlines() if line]


def _log_gz(run_id: str, artifact: str, text: str) -> None:
    from prefixflow.services import tracking

    with tempfile.TemporaryDirectory(prefix="prefixflow-lineage-") as tmp:
        path = Path(tmp) / Path(artifact).name
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
        with boundary.mlflow_calls("log_artifact", artifacts=True):
            tracking.client().log_artifact(run_id, str(path), str(Path(artifact).parent))


def _logged_gz(run_id: str, artifact: str) -> str | None:
    import mlflow.artifacts

    from prefixflow.services import tracking

    with boundary.mlflow_calls("list_artifacts", artifacts=True):
        listed = {f.path for f in tracking.client().list_artifacts(run_id, str(Path(artifact).parent))}
    if artifact not in listed:
        return None
    with tempfile.TemporaryDirectory(prefix="prefixflow-lineage-") as tmp:
        with boundary.mlflow_calls("download_artifacts", artifacts=True):
            got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp,
                                                      tracking_uri=tracking.tracking_uri())
        return gzip.decompress(Path(got).read_bytes()).decode()
