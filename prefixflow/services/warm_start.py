"""Warm start (``prefix.init: champion``): a training that continues from a registered version's prefix (its
embedding and MLP, ``trainable.safetensors`` in the artifact) instead of a random one.

:func:`plan` decides before the launch, in this order: no version behind the reference yet (the client's first
run) → a cold start (random init), said in the log; rows that version was trained on are gone from this run's
data (or it predates the row record) → a cold start, because a warm start would keep what the removed rows taught;
prefixes of another shape → :class:`TrainingError` (one message, nothing changes); else the version's prefix is
downloaded into the run's folder and the job loads it (the base model is checked there).

Which rows a version was trained on: the digests its run logged (``lineage.log_rows``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel

from prefix_core import PrefixArtifact, PrefixConfig
from prefixflow.services import lineage, registry, tracking
from prefixflow.services.errors import TrainingError
from prefixflow.services.preparation import PreparedData
from prefixflow.services.spec import PipelineSpec

# Deferred imports: mlflow is deferred to the calls; prefix_core.model (transformers) to plan.

WARM_CONTEXT = "warm-start"  # the dataset inputs a warm-started run inherits from the version it started from
FOLDER = "warm-start"  # in the run's folder: the downloaded prefix


class WarmStart(BaseModel):
    """What ``prefix.init: champion`` became for one run: ``version`` set for a warm start (its prefix in
    ``artifact_dir``), else ``cold`` says why it started cold."""

    reference: str
    name: str
    version: str | None = None
    run_id: str | None = None
    artifact_dir: str | None = None
    cold: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


def plan(spec: PipelineSpec, data: PreparedData, folder: Path, logger: logging.Logger | logging.LoggerAdapter
         ) -> WarmStart | None:
    """What ``prefix.init: champion`` means for this run (None for any other init); see the module docstring.
    Raises TrainingError when the version's prefix cannot be continued, RegistryError for an ``init_from`` that
    does not resolve."""
    if spec.prefix.init != "champion":
        return None
    reference = spec.prefix.init_from or f"{spec.client}/{spec.task}@champion"
    name = registry.parse_ref(reference)[0]
    cold = WarmStart(reference=reference, name=name)
    if spec.prefix.init_from is None and registry.alias_version(name, "champion") is None:
        cold.cold = f"{name} has no @champion yet"
        logger.info("warm start: %s, so this training starts cold (random init)", cold.cold)
        return cold
    mv = registry.resolve(reference)
    ws = WarmStart(reference=reference, name=name, version=str(mv.version), run_id=mv.run_id)
    rows = lineage.logged_rows(mv.run_id) if mv.run_id else None
    if rows is None:
        ws.cold = f"{ws.label} keeps no record of its rows, so removed rows cannot be ruled out"
    elif removed := len(rows - lineage.row_digests(data)):
        ws.cold = (f"{removed} of the {len(rows)} rows {ws.label} was trained on are no longer in the data (a warm "
                   "start would keep what they taught)")
    if ws.cold:
        logger.warning("warm start: %s, so this training starts cold (random init)", ws.cold)
        return ws
    from prefix_core.model import warm_start_mismatch

    artifact_dir = registry.download_version(mv, folder / FOLDER)
    config = PrefixConfig(num_virtual_tokens=spec.prefix.num_virtual_tokens,
                          projection_hidden=spec.prefix.projection_hidden)
    problem = warm_start_mismatch(PrefixArtifact.load(artifact_dir), config)
    if problem is not None:
        raise TrainingError(f"prefix.init: champion cannot start from {ws.label} ({reference}): {problem}")
    ws.artifact_dir = str(artifact_dir)
    logger.info("warm start from %s (%s): its prefix, MLP included, is where this training begins", ws.label,
                reference)
    return ws


def log_chain(run_id: str, ws: WarmStart) -> None:
    """Add the data of the version this run started from (its own and what it inherited in turn) to this run's
    dataset inputs, with the context ``warm-start`` and the name ``NAME via CLIENT-TASK vN``: the lineage of the
    whole warm-start chain (v3 started from v2, which started from v1: ``acme/e2e:train via acme-e2e v1 via
    acme-e2e v2``)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    def via(d) -> Dataset:  # its own name: MLflow keeps one input per dataset and run, whatever its context
        return Dataset(name=f"{d.name} via {ws.label}", digest=d.digest, source_type=d.source_type, source=d.source,
                       schema=d.schema, profile=d.profile)

    source = tracking.client().get_run(ws.run_id)
    inherited = [DatasetInput(via(item.dataset), tags=[InputTag(lineage.CONTEXT_TAG, WARM_CONTEXT)])
                 for item in source.inputs.dataset_inputs]
    if inherited:
        tracking.client().log_inputs(run_id, datasets=inherited)
