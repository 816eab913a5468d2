"""What each machine of a multi-machine training runs (``python -m prefixflow.launch.node_launch``): its rank and the
rendezvous from the flags or the scheduler's environment (Kubernetes, Slurm), only machine 0 watching for
hangs, two "machines" on this host (ddp, gloo on CPU), and a user error as exit code 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import prefixflow.launch.node_launch as node_launch
from prefixflow.launch.node_launch import (
    SchedulerEnvError,
    machine_rank_from_env,
    main,
    slurm_main_address,
    slurm_main_port,
)
from prefixflow.services.spec import TrainSpec

REPO = Path(__file__).resolve().parent.parent
JOB_FILE = "/shared/prefixflow/runs/acme/e2e/run1/job.json"


def test_launch_needs_a_machine_rank(monkeypatch, capsys):
    for var in ("JOB_COMPLETION_INDEX", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert main([JOB_FILE, "--strategy", "ddp", "--processes-per-machine", "1", "--machines", "2",
                 "--main-address", "localhost", "--main-port", "29500"]) == 2
    assert "JOB_COMPLETION_INDEX" in capsys.readouterr().err


def test_rank_address_and_port_come_from_the_scheduler(monkeypatch):
    assert machine_rank_from_env({"JOB_COMPLETION_INDEX": "2", "SLURM_PROCID": "5"}) == 2
    assert machine_rank_from_env({"SLURM_PROCID": "1"}) == 1
    assert slurm_main_port({"SLURM_JOB_ID": "123457"}) == 20000 + 123457 % 20000
    assert slurm_main_port({}) is None
    with pytest.raises(SchedulerEnvError, match="SLURM_JOB_NODELIST"):
        slurm_main_address({})
    calls = []

    def scontrol(*args):
        calls.append(args)
        return "gpu-a17\ngpu-a18\n" if args[:2] == ("show", "hostnames") else \
            "NodeName=gpu-a17 Arch=x86_64 NodeAddr=10.1.0.17 NodeHostName=gpu-a17 Version=22.05\n"

    monkeypatch.setattr(node_launch, "_scontrol", scontrol)
    assert slurm_main_address({"SLURM_JOB_NODELIST": "gpu-a[17-18]"}) == "10.1.0.17"
    assert calls == [("show", "hostnames", "gpu-a[17-18]"), ("show", "node", "-o", "gpu-a17")]


def test_only_machine_0_watches_for_hangs(monkeypatch, tmp_path):
    """The job prints progress on its main process only, so machines > 0 are silent while healthy."""
    import prefixflow.launch.command as launch_mod
    import prefixflow.launch.gang as gang_mod

    seen = {}
    monkeypatch.setattr(node_launch, "build_launch", lambda train, job, machine_rank: launch_mod.Launch(["x"]))
    monkeypatch.setattr(node_launch, "run_launch", lambda lw, on_event, log_file, hang_timeout_s: seen.update(
        {log_file.name: hang_timeout_s}) or gang_mod.LaunchResult(0, "ok", None, []))
    train = TrainSpec(strategy="ddp", processes_per_machine=2, machines=2, main_address="localhost",
                      main_port=29500, hang_timeout_s=120)
    assert node_launch.launch_machine(tmp_path / "job.json", train, 0) == 0
    assert node_launch.launch_machine(tmp_path / "job.json", train, 1) == 0
    assert seen == {"train-machine0.log": 120, "train-machine1.log": float("inf")}




# --- two "machines" on this host (two pods of the Indexed Job) ------------------------------------------
@pytest.mark.slow
def test_launch_two_machines_on_cpu(tmp_path):
    """Both ranks of a 2-machine ddp job through the pods' entry point (1 process per machine)."""
    from prefix_core import PrefixArtifact
    from prefixflow.launch.command import free_port
    from prefixflow.launch.train_job import TrainJob
    from support.tiny_models import char_tokenizer, make_base

    make_base("llama").save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"source": f"{i}", "target": ["aaa", "bbb"][i % 2]}) + "\n" for i in range(16)))
    run = tmp_path / "run"
    job = TrainJob(base_model=str(tmp_path / "model"), data_dir=str(tmp_path / "data"), template="n {source} :",
                   prefix={"num_virtual_tokens": 2, "projection_hidden": 8},
                   train={"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "log_every": 2,
                          "checkpoint_every": 2, "eval_every": 0},
                   strategy="ddp", checkpoint_dir=str(run / "ckpt"), output_dir=str(run / "prefix")).to_json(
        run / "job.json")
    common = [sys.executable, "-m", "prefixflow.launch.node_launch", str(job), "--strategy", "ddp",
              "--processes-per-machine", "1", "--machines", "2", "--main-address", "localhost",
              "--main-port", str(free_port()), "--hang-timeout-s", "240"]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    # machine 1 takes its rank from the Indexed Job's variable, machine 0 from the flag
    procs = [subprocess.Popen([*common, "--machine-rank", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True),
             subprocess.Popen(common, cwd=REPO, env={**env, "JOB_COMPLETION_INDEX": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "--machine_rank 0" in outs[0] and "--machine_rank 1" in outs[1]
    events = [json.loads(line.split(" ", 1)[1]) for line in outs[0].splitlines() if line.startswith("PREFIXFLOW_EVENT")]
    assert next(e for e in events if e["event"] == "loaded")["processes"] == 2
    assert [e["event"] for e in events[-2:]] == ["artifact", "usage"] and events[-1]["processes"] == 2
    assert PrefixArtifact.load(run / "prefix").manifest["training"]["steps"] == 4
    assert (run / "train-machine0.log").exists() and (run / "train-machine1.log").exists()


@pytest.mark.slow
def test_launch_fails_the_pod_on_a_user_error(tmp_path):
    """A job that cannot run exits non-zero (3, user error): podFailurePolicy then fails the Job."""
    from prefixflow.launch.command import free_port
    from prefixflow.launch.protocol import USER_ERROR_EXIT
    from prefixflow.launch.train_job import TrainJob

    job = TrainJob(base_model="smollm2-135m", data_dir=str(tmp_path / "missing"), template="{source}",
                   train={"max_steps": 2}, strategy="single", checkpoint_dir=str(tmp_path / "ckpt"),
                   output_dir=str(tmp_path / "prefix")).to_json(tmp_path / "job.json")
    out = subprocess.run([sys.executable, "-m", "prefixflow.launch.node_launch", str(job), "--strategy", "single",
                          "--processes-per-machine", "1", "--machines", "1", "--machine-rank", "0",
                          "--main-address", "localhost", "--main-port", str(free_port())],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == USER_ERROR_EXIT, out.stdout + out.stderr
    assert "training user_error on machine 0" in out.stderr and "does not exist" in out.stderr
