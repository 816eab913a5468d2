"""The state folder's disk fills up in the middle of training (a 64 MiB tmpfs holds the whole state folder:
prepared data, checkpoints, the embedded MLflow store and Prefect's database). The run must end in one message
that names the full disk and the command that finishes the run, leave no version registered and no checkpoint
that looks complete but is not, and, once space is freed, that command resumes from the last good checkpoint and
registers exactly one version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.faults import fill_fault
from support.harness import registry_snapshot, require
from support.pipeline import save_tiny_model, spec_dict, write_task

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (mounting needs root, which CI has)."""
    require("root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def versions(state: Path, name: str) -> list[tuple[str, dict]]:
    """(version, the model's aliases) of each version of ``name`` in the state folder's registry."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow' / 'mlflow.db'}")
    model = registry_snapshot(client, [name], runs=False)["models"].get(name)
    return [(v.version, model.aliases) for v in model.versions] if model else []


def test_a_full_disk_mid_training_ends_in_one_message_and_the_rerun_registers_once(small_disk, tmp_path):
    from prefix_core.checkpoint import complete_checkpoints

    state, ballast = small_disk / "state", small_disk / "ballast"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(save_tiny_model(tmp_path / "model"), write_task(tmp_path / "d.jsonl"),
                                             client="full", task="disk")))
    env = {**os.environ, "PREFIXFLOW_HOME": str(state), "PREFECT_HOME": str(state / "prefect"), "COLUMNS": "200"}
    # the embedded API; and no retry of its 500s, which an earlier test of this worker that ran against a Prefect
    # server may have left in the environment (settings.SERVER_DEFAULTS): each call would back off for minutes
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_CLIENT_RETRY_EXTRA_CODES"):
        env.pop(k, None)
    command = [str(Path(sys.executable).with_name("prefixflow")), "run", str(spec), "--run-key", "full"]

    # the disk fills after step 3's checkpoint: step 6's checkpoint, metrics and Prefect's database fail
    failed = subprocess.run(command, env={**env, **fill_fault(0, 3, ballast)}, capture_output=True, text=True,
                            timeout=600)
    out = " ".join((failed.stdout + failed.stderr).split())
    assert failed.returncode == 1, out[-3000:]
    assert "error: no space left on the device" in out, out[-3000:]
    assert f"`prefixflow run {spec} --run-key full` finishes this run" in out, out[-3000:]
    print("what the user saw:", out[out.rfind("error: "):])  # shown by pytest -rP (docs/reliability.md)
    run_dir = state / "runs" / "full" / "disk" / "full"
    assert [c.name for c in complete_checkpoints(run_dir / "checkpoints")] == ["step-00000003"]
    assert versions(state, "full-disk") == []

    ballast.unlink()  # the user frees space
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    out = " ".join((rerun.stdout + rerun.stderr).split())
    assert rerun.returncode == 0, out[-3000:]
    assert "resumed from checkpoint" in out and "(step 3)" in out, out[-3000:]
    assert "registered full-disk v1" in out, out[-3000:]
    assert versions(state, "full-disk") == [("1", {"candidate": "1", "champion": "1"})]
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # the half-written step 6 was cleared
