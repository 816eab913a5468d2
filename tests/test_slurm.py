"""``train.launcher: slurm``: the pipeline runs training with ``srun`` over several nodes.

The slow tests start a real Slurm cluster on this host (``tests/support/slurm_cluster.py``: munged, slurmctld
and two slurmd "nodes" on 127.0.0.1; the Debian packages are installed by ``make setup`` when run as
root). A 2-machine ddp training runs through the whole pipeline flow, one rank is SIGKILLed, Prefect
retries the training task, every node is relaunched by a new ``srun`` and the run resumes from the
last checkpoint to the prefix of an uninterrupted single-process run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefixflow.launch import slurm
from prefixflow.services.errors import TrainingError
from prefixflow.services.spec import SlurmSpec, TrainSpec, parse_spec
from support.faults import hang_fault
from support.harness import require, wait_until
from support.pipeline import patched_environ, save_tiny_model, spec_dict, survivors, write_task
from support.slurm_cluster import running_cluster


def test_srun_runs_one_node_launch_per_machine(tmp_path):
    train = TrainSpec(strategy="deepspeed-zero3", processes_per_machine=4, machines=3, hang_timeout_s=600,
                      launcher="slurm", slurm=SlurmSpec(partition="gpu", account="ml", time_limit="12:00:00",
                                                        gpus_per_node=4, cpus_per_task=32, extra_args=["--exclusive"]))
    launch = slurm.build_srun(train, tmp_path / "job.json", "prefixflow-acme-e2e-r1")
    argv = launch.argv
    cut = argv.index(sys.executable)
    assert launch.queued  # the hang clock starts when a node prints, not while the job waits for nodes
    assert argv[:cut] == ["srun", "--quiet", "--job-name=prefixflow-acme-e2e-r1", "--nodes=3", "--ntasks=3",
                          "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--chdir={tmp_path}", "--partition=gpu",
                          "--account=ml", "--time=12:00:00", "--gpus-per-node=4", "--cpus-per-task=32", "--exclusive"]
    assert argv[cut:] == [sys.executable, "-m", "prefixflow.launch.node_launch", str(tmp_path / "job.json"),
                          "--strategy", "deepspeed-zero3", "--processes-per-machine", "4", "--machines", "3",
                          "--hang-timeout-s", "600"]  # no --main-port: each node derives it from the Slurm job id
    assert "--main-port" in slurm.build_srun(train.model_copy(update={"main_port": 29511}), tmp_path / "j", "n").argv


def test_job_names_are_per_run_and_safe():
    assert slurm.job_name("acme", "e2e", "2026-11-27 run/1") == "prefixflow-acme-e2e-2026-11-27-run-1"
    assert slurm.job_name("acme", "e2e", "a") != slurm.job_name("acme", "e2e", "b")


def test_without_slurm_commands_the_error_says_where_to_run(monkeypatch, tmp_path):
    from prefixflow.launch.training import _build

    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    spec = parse_spec({"client": "a", "task": "b", "data": {"source": "x.csv"},
                       "train": {"strategy": "ddp", "machines": 2, "processes_per_machine": 1, "launcher": "slurm"}})
    with pytest.raises(TrainingError, match="srun, scancel, squeue not found on PATH"):
        _build(spec, tmp_path / "job.json", "r1", None)


def test_local_launcher_refuses_several_machines():
    from prefixflow.launch.training import _launch

    spec = parse_spec({"client": "a", "task": "b", "data": {"source": "x.csv"},
                       "train": {"strategy": "ddp", "machines": 2}})
    with pytest.raises(TrainingError, match=r"train\.launcher: slurm"):
        _launch(spec, None, "r1", Path("/nonexistent"), None, None)


# --- a real Slurm cluster on this host -------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require("slurm")
    with running_cluster(tmp_path_factory.mktemp("slurm"), nodes=2) as c, patched_environ(c.env()):
        yield c


@pytest.fixture(scope="module")
def pipeline_env(cluster, tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("slurm-pipeline")
    with patched_environ({"PREFIXFLOW_HOME": str(root / "state")}, unset=("MLFLOW_TRACKING_URI",)), \
            prefect_test_harness(server_startup_timeout=120):
        yield {"model": save_tiny_model(root / "tiny-llama"), "data": write_task(root / "rev.jsonl", n=120)}


def _running(name: str) -> None:
    """Until Slurm runs the job ``name`` (60 s at most)."""
    wait_until(lambda: any("RUNNING" in line for line in _squeue(name)), 60, 0.5, message=lambda: str(_squeue()))


def _squeue(name: str | None = None) -> list[str]:
    args = ["squeue", "--noheader", "--format=%i %j %T", *([f"--name={name}"] if name else [])]
    return [line for line in subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines()
            if line.strip()]


@pytest.mark.slow
def test_two_node_training_is_killed_retried_by_prefect_and_resumes_exactly(pipeline_env, monkeypatch, tmp_path,
                                                                            fault_rng):
    from prefix_core import PrefixArtifact
    from prefixflow.flows.pipeline import prefix_pipeline
    from support.faults import kill_fault

    reference = prefix_pipeline(parse_spec(spec_dict(pipeline_env["model"], pipeline_env["data"], client="slurm",
                                                     task="local")), run_key="reference")
    step, rank = fault_rng.choice([4, 5]), fault_rng.choice([0, 1])  # checkpoint at 3
    marker = tmp_path / "killed"
    for key, value in kill_fault(rank, step, marker).items():
        monkeypatch.setenv(key, value)
    d = spec_dict(pipeline_env["model"], pipeline_env["data"], client="slurm", task="nodes")
    d["train"].update(strategy="ddp", processes_per_machine=1, machines=2, launcher="slurm", hang_timeout_s=240)
    result = prefix_pipeline(parse_spec(d), run_key="two-nodes")

    assert marker.read_text() == str(step)  # a rank on node `rank` really died once
    assert result.trained.resumed_from == 3 and result.trained.steps == 6
    assert result.registration.version  # evaluated and registered like any other run
    run = Path(result.trained.run_dir)
    assert (run / "train-machine0.log").exists() and (run / "train-machine1.log").exists()
    log = (run / "train.log").read_text()
    assert "machine 0 of 2" in log and "machine 1 of 2" in log  # srun relayed both nodes
    ours = PrefixArtifact.load(result.trained.artifact_uri).table()
    ref = PrefixArtifact.load(reference.trained.artifact_uri).table()
    assert (ours - ref).abs().max().item() <= 1e-5  # ddp all-reduce order vs one process: ~1e-7
    assert _squeue(slurm.job_name("slurm", "nodes", "two-nodes")) == []  # no job left behind


@pytest.mark.slow
def test_a_leftover_job_of_an_earlier_try_is_cancelled_before_relaunch(cluster):
    name = slurm.job_name("acme", "e2e", "left-over")
    stale = subprocess.Popen(["srun", f"--job-name={name}", "--nodes=2", "--ntasks=2", "sleep", "300"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _running(name)
        cancelled = slurm.cancel_leftovers(name)
        assert len(cancelled) == 1 and "RUNNING" in cancelled[0]
        assert _squeue(name) == []
        assert stale.wait(timeout=60) != 0  # the stale srun ended with its job
        assert slurm.cancel_leftovers(name) == []  # nothing to do the second time
    finally:
        stale.kill()


def _tiny_job(tmp_path: Path, steps: int) -> Path:
    from prefixflow.launch.train_job import TrainJob
    from support.pipeline import save_tiny_model, write_task

    model = save_tiny_model(tmp_path / "model")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(write_task(tmp_path / "rows.jsonl", n=40).read_text())
    run = tmp_path / "run"
    return TrainJob(base_model=str(model), data_dir=str(tmp_path / "data"), template="in: {source}\nout:",
                    prefix={"num_virtual_tokens": 2, "projection_hidden": 8},
                    train={"max_steps": steps, "batch_size": 4, "learning_rate": 1e-2, "log_every": 1,
                           "eval_every": 0}, strategy="ddp", checkpoint_dir=str(run / "ckpt"),
                    output_dir=str(run / "prefix")).to_json(run / "job.json")


@pytest.mark.slow
def test_waiting_for_nodes_is_not_a_hang(cluster, tmp_path, monkeypatch):
    """Both nodes are busy for 52 s; the training's srun waits in the queue longer than its hang timeout
    (40 s, no backstop margin here) and then trains to the end."""
    from prefixflow.launch.gang import run_launch

    monkeypatch.setattr(slurm, "HANG_MARGIN_S", 0.0)
    job = _tiny_job(tmp_path, steps=4)
    blocker = subprocess.Popen(["srun", "--job-name=blocker", "--nodes=2", "--ntasks=2", "--cpus-per-task=2",
                                "sleep", "52"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _running("blocker")
        train = TrainSpec(strategy="ddp", processes_per_machine=1, machines=2, launcher="slurm", hang_timeout_s=40)
        started = time.monotonic()
        result = run_launch(slurm.build_srun(train, job, slurm.job_name("acme", "e2e", "queued")), lambda e: None,
                            log_file=job.parent / "train.log", hang_timeout_s=slurm.flow_hang_timeout(train))
        assert result.reason == "ok", (result.reason, result.error, result.tail)
        assert time.monotonic() - started > 45  # it really waited longer than the hang timeout
        assert blocker.wait(timeout=30) == 0
    finally:
        blocker.kill()


@pytest.mark.slow
def test_a_hung_rank_on_a_node_ends_the_whole_srun(cluster, tmp_path):
    """Rank 1 (on node 1) hangs after step 2: rank 0 blocks in the all-reduce, machine 0's launcher sees
    no output for hang_timeout_s, kills its ranks and exits 1, srun's --kill-on-bad-exit ends node 1; the
    flow side gets one line saying so, and nothing of the job is left in Slurm's queue or the process table."""
    from prefixflow.launch.gang import run_launch

    job = _tiny_job(tmp_path, steps=6)
    run = job.parent
    train = TrainSpec(strategy="ddp", processes_per_machine=1, machines=2, launcher="slurm", hang_timeout_s=45)
    name = slurm.job_name("acme", "e2e", "hung")
    launch = slurm.build_srun(train, job, name)
    launch.env.update(hang_fault(1, 2))
    steps = []
    started = time.monotonic()
    result = run_launch(launch, lambda e: steps.append(e.get("step")) if e.get("event") == "step" else None,
                        log_file=run / "train.log", hang_timeout_s=slurm.flow_hang_timeout(train))
    assert result.reason == "failed", (result.reason, result.error, result.tail)
    assert result.error.startswith("training hung on machine 0: no output for 45 s"), result.error
    assert max(steps) <= 3 and time.monotonic() - started < 180
    wait_until(lambda: not (_squeue(name) or survivors(job)), 60, 1,  # Slurm's KillWait is 10 s in the local cluster
               message=lambda: f"left: {_squeue(name)}, {survivors(job)}")
