"""Stopping a `prefixflow` command with a signal, as a user would: nothing it started keeps running, it says
what happened and how to finish, and `prefixflow run --run-key K` then finishes the same run (one version)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from support.pipeline import marked, save_tiny_model, spec_dict, write_task

CLIENT_ENV = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFIXFLOW_HOME", "PREFECT_HOME")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_leaves_nothing_running_and_its_run_key_finishes_it(tmp_path, sig):
    model, data = save_tiny_model(tmp_path / "model"), write_task(tmp_path / "rev.jsonl", n=120)
    d = spec_dict(model, data)
    d["train"].update(max_steps=90, checkpoint_every=5, eval_every=45)  # a log line every 3 steps
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(d))
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    env.update(PREFIXFLOW_HOME=str(tmp_path / "state"), PREFIXFLOW_TEST_MARK=mark, COLUMNS="200")
    exe = str(Path(sys.executable).with_name("prefixflow"))
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        # as from a terminal: SIGINT at its default (pytest-xdist workers ignore it, and children inherit that)
        proc = subprocess.Popen([exe, "run", str(spec)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"step (1[0-9]|[2-9][0-9])/90", log.read_text()):  # past two checkpoints
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.kill(proc.pid, sig)  # the command only, as a service manager (SIGTERM) or a terminal (Ctrl-C) would
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = " ".join(log.read_text().split())
    assert code == 128 + sig, text[-3000:]
    name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    assert f"stopped by {name}" in text and "Traceback" not in text
    key = text.split("run key ")[1].split(":")[0].strip()
    assert f"--run-key {key}" in text.split("stopped by")[1]
    deadline = time.monotonic() + 15
    while marked(mark) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marked(mark) == []  # no rank, launcher or ephemeral Prefect API left behind
    if sig != signal.SIGTERM:
        return

    again = subprocess.run([exe, "run", str(spec), "--run-key", key], env=env, capture_output=True, text=True,
                           timeout=900)
    out = " ".join((again.stdout + again.stderr).split())
    assert again.returncode == 0, out[-3000:] + again.stderr[-3000:]
    assert "registered acme-rev v1" in out and "resumed from checkpoint" in out
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}"
    assert len(MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name = 'acme-rev'")) == 1
    assert marked(mark) == []
