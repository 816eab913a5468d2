"""launch.command and launch.gang: the accelerate command per strategy, and running it as a gang (fast: fake ranks)."""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from prefixflow import processes
from prefixflow.launch import command as launch_mod
from prefixflow.launch import gang as gang_mod
from prefixflow.launch.command import Launch, build_launch
from prefixflow.launch.gang import run_launch
from prefixflow.launch.train_job import TrainJob
from prefixflow.services.spec import TrainSpec
from support.harness import wait_until

REPO = Path(__file__).resolve().parent.parent
GANG = str(REPO / "tests" / "workers" / "gang.py")


def opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


alive = processes.alive  # running, not a zombie


def pids_in(lines: list[str]) -> list[int]:
    return sorted({int(w) for line in lines for w in line.split() if w.isdigit() and int(w) > 1})


# --- build_launch ----------------------------------------------------------------------------------
@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(launch_mod, "visible_gpus", lambda: 0)


def test_single_on_cpu(cpu_only, tmp_path):
    job = tmp_path / "job.json"
    lw = build_launch(TrainSpec(strategy="single"), job)
    assert lw.argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert lw.argv[-3:] == ["-m", "prefixflow.launch.train_job", str(job)]
    assert opt(lw.argv, "--num_processes") == "1" and opt(lw.argv, "--num_machines") == "1"
    assert opt(lw.argv, "--config_file").endswith("infra/accelerate/single.yaml")
    assert Path(opt(lw.argv, "--config_file")).is_file()
    assert opt(lw.argv, "--mixed_precision") == "no"
    assert "--multi_gpu" not in lw.argv and "--use_deepspeed" not in lw.argv
    assert lw.env["ACCELERATE_USE_CPU"] == "1" and "DS_ACCELERATOR" not in lw.env
    assert 1 <= int(opt(lw.argv, "--main_process_port")) < 65536


def test_ddp_on_cpu(cpu_only, tmp_path):
    lw = build_launch(TrainSpec(strategy="ddp", processes_per_machine=2), tmp_path / "job.json", main_port=29555)
    assert "--multi_gpu" in lw.argv and opt(lw.argv, "--num_processes") == "2"
    assert opt(lw.argv, "--config_file").endswith("infra/accelerate/ddp.yaml")
    assert opt(lw.argv, "--main_process_port") == "29555" and opt(lw.argv, "--main_process_ip") == "127.0.0.1"
    assert lw.env["ACCELERATE_USE_CPU"] == "1"  # FACTS: --multi_gpu + ACCELERATE_USE_CPU -> gloo
    assert int(opt(lw.argv, "--num_cpu_threads_per_process")) >= 1


@pytest.mark.parametrize(("strategy", "stage"), [("deepspeed-zero2", 2), ("deepspeed-zero3", 3)])
def test_deepspeed_on_cpu(cpu_only, tmp_path, strategy, stage):
    lw = build_launch(TrainSpec(strategy=strategy, processes_per_machine=2), tmp_path / "job.json")
    assert "--use_deepspeed" in lw.argv and opt(lw.argv, "--num_processes") == "2"
    ds = json.loads(Path(opt(lw.argv, "--deepspeed_config_file")).read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert "optimizer" not in ds and "scheduler" not in ds  # only the prefix's AdamW, from the trainer
    assert opt(lw.argv, "--zero3_init_flag") == "false"
    assert opt(lw.argv, "--deepspeed_multinode_launcher") == "standard"
    assert lw.env["DS_ACCELERATOR"] == "cpu"
    assert "ACCELERATE_USE_CPU" not in lw.env  # it would switch DeepSpeed off inside Accelerator


def test_multi_machine(cpu_only, tmp_path):
    spec = TrainSpec(strategy="ddp", processes_per_machine=2, machines=3, main_address="10.0.0.5", main_port=29500)
    lw = build_launch(spec, tmp_path / "job.json", machine_rank=2)
    assert opt(lw.argv, "--num_processes") == "6" and opt(lw.argv, "--num_machines") == "3"
    assert opt(lw.argv, "--machine_rank") == "2"
    assert opt(lw.argv, "--main_process_ip") == "10.0.0.5" and opt(lw.argv, "--main_process_port") == "29500"
    lw = build_launch(spec, tmp_path / "job.json", machine_rank=1, main_address="10.0.0.9", main_port=1234)
    assert opt(lw.argv, "--main_process_ip") == "10.0.0.9" and opt(lw.argv, "--main_process_port") == "1234"
    with pytest.raises(ValueError, match="main_port"):
        build_launch(spec.model_copy(update={"main_port": None}), tmp_path / "job.json")
    with pytest.raises(ValueError, match="machine_rank"):
        build_launch(spec, tmp_path / "job.json", machine_rank=3)
    with pytest.raises(ValueError, match="one process"):  # refused by the spec itself
        TrainSpec(strategy="single", processes_per_machine=2)


def test_gpus_use_nccl_and_keep_cuda_visible_devices(monkeypatch, tmp_path):
    monkeypatch.setattr(launch_mod, "visible_gpus", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    for strategy in ("ddp", "deepspeed-zero3"):
        lw = build_launch(TrainSpec(strategy=strategy, processes_per_machine=2), tmp_path / "job.json")
        assert "ACCELERATE_USE_CPU" not in lw.env and "CUDA_VISIBLE_DEVICES" not in lw.env
        assert "--num_cpu_threads_per_process" not in lw.argv
        assert lw.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert lw.env["DS_ACCELERATOR"] == "cuda"
    with pytest.raises(ValueError, match="visible GPU"):
        build_launch(TrainSpec(strategy="ddp", processes_per_machine=4), tmp_path / "job.json")


# --- run_launch: output, events, errors ------------------------------------------------------------
def test_events_log_and_ok(tmp_path):
    code = ("import json\nprint('hello')\n"
            "for i in range(3): print('PREFIXFLOW_EVENT ' + json.dumps({'event': 'step', 'step': i}), flush=True)\n"
            "print('PREFIXFLOW_EVENT not json')")
    events = []
    res = run_launch(Launch([sys.executable, "-c", code], {}), events.append, log_file=tmp_path / "logs" / "x.log")
    assert (res.returncode, res.reason, res.error) == (0, "ok", None)
    assert [e["step"] for e in events] == [0, 1, 2]
    assert (tmp_path / "logs" / "x.log").read_text().splitlines()[0] == "hello"
    assert res.tail[-1] == "PREFIXFLOW_EVENT not json"


def test_failure_summary(tmp_path):
    code = "import sys\nprint('working')\nraise RuntimeError('disk on fire')"
    res = run_launch(Launch([sys.executable, "-c", code], {}), lambda e: None, log_file=tmp_path / "log")
    assert res.returncode == 1 and res.reason == "failed"
    assert res.error == "RuntimeError: disk on fire"


def test_user_error_from_the_job(tmp_path):
    """A real train_job with an invalid template: PREFIXFLOW_ERROR, exit code 3, reason user_error."""
    job = TrainJob(base_model="unused", data_dir=str(tmp_path), template="no placeholder", strategy="single",
                   output_dir=str(tmp_path / "out")).to_json(tmp_path / "job.json")
    direct = Launch([sys.executable, "-m", "prefixflow.launch.train_job", str(job)], {"PYTHONPATH": str(REPO)})
    res = run_launch(direct, lambda e: None, log_file=tmp_path / "log", cwd=REPO)
    assert res.returncode == 3 and res.reason == "user_error"
    assert "{source}" in res.error and "\n" not in res.error


def test_user_error_through_accelerate(cpu_only, tmp_path):
    job = TrainJob(base_model="unused", data_dir=str(tmp_path), template="{source}", strategy="single",
                   train={"batch_size": 0}, output_dir=str(tmp_path / "out")).to_json(tmp_path / "job.json")
    res = run_launch(build_launch(TrainSpec(strategy="single"), job), lambda e: None, log_file=tmp_path / "log")
    assert res.returncode != 0 and res.reason == "user_error"
    assert "batch_size must be >= 1" in res.error


def test_on_event_exception_kills_the_group_and_propagates(tmp_path):
    code = "import time\nprint('PREFIXFLOW_EVENT {\"event\": \"x\"}', flush=True)\ntime.sleep(600)"

    def boom(event):
        raise KeyError("callback failed")

    t = time.monotonic()
    with pytest.raises(KeyError):
        run_launch(Launch([sys.executable, "-c", code], {}), boom, log_file=tmp_path / "log")
    assert time.monotonic() - t < 30


# --- run_launch: gang semantics --------------------------------------------------------------------
def test_hang_kills_the_whole_group(monkeypatch, tmp_path):
    """No output for hang_timeout_s: SIGTERM (ignored here), then SIGKILL; nothing survives."""
    monkeypatch.setattr(gang_mod, "TERM_GRACE_S", 1.0)
    t = time.monotonic()
    res = run_launch(Launch([sys.executable, GANG, "launcher", "hang", "-m", "gang-rank"], {}), lambda e: None,
                     log_file=tmp_path / "log", hang_timeout_s=2)
    took = time.monotonic() - t
    assert res.reason == "hung" and "no output for 2 s" in res.error
    assert res.returncode == -signal.SIGKILL
    pids = pids_in(res.tail)
    assert len(pids) == 3 and not any(alive(p) for p in pids)
    assert took < 15


def test_a_job_that_lingers_after_its_artifact_is_stopped_soon_and_says_it_was_done(monkeypatch, tmp_path):
    """Once the job's artifact event came, its processes get TEARDOWN_GRACE_S (not the hang timeout) to exit,
    and the result says the work was done; without the event, the same silence waits for the hang timeout."""
    monkeypatch.setattr(gang_mod, "TEARDOWN_GRACE_S", 1.0)
    done = ("import json, time; print('PREFIXFLOW_EVENT ' + json.dumps({'event': 'artifact', 'path': 'p'}), "
            "flush=True); time.sleep(600)")
    t = time.monotonic()
    res = run_launch(Launch([sys.executable, "-c", done], {}), lambda e: None, log_file=tmp_path / "log",
                     hang_timeout_s=120)
    assert res.reason == "hung" and res.done and "artifact was written" in res.error
    assert time.monotonic() - t < 30
    member = done.replace("'path': 'p'", "'path': 'p', 'member': 'm'")  # a pack member's: the pack goes on
    res = run_launch(Launch([sys.executable, "-c", member], {}), lambda e: None, log_file=tmp_path / "log2",
                     hang_timeout_s=3)
    assert res.reason == "hung" and not res.done and "no output for 3 s" in res.error


def test_a_queued_launch_is_not_hung_before_its_first_output(tmp_path):
    """A scheduler's launch (srun) prints nothing while it waits for nodes: that is not a hang."""
    code = "import time; time.sleep(3); print('started', flush=True); time.sleep(0.5); print('done', flush=True)"
    res = run_launch(Launch([sys.executable, "-c", code], {}, queued=True), lambda e: None,
                     log_file=tmp_path / "log", hang_timeout_s=1.5)
    assert res.reason == "ok" and res.tail == ["started", "done"]
    res = run_launch(Launch([sys.executable, "-c", code], {}), lambda e: None, log_file=tmp_path / "log2",
                     hang_timeout_s=1.5)
    assert res.reason == "hung"


def test_dying_rank_tears_down_a_launcher_that_does_not(monkeypatch, tmp_path):
    """The fake launcher ignores its dead rank: run_launch's own bound (GANG_GRACE_S) kills the group."""
    monkeypatch.setattr(gang_mod, "GANG_GRACE_S", 1.0)
    t = time.monotonic()
    res = run_launch(Launch([sys.executable, GANG, "launcher", "die", "-m", "gang-rank"], {}), lambda e: None,
                     log_file=tmp_path / "log", hang_timeout_s=60)
    assert res.reason == "failed" and "a rank exited" in res.error
    pids = pids_in([line for line in res.tail if "pid" in line])
    assert len(pids) >= 3 and not any(alive(p) for p in pids)
    assert time.monotonic() - t < 20


def test_launcher_exit_leaves_no_orphans(tmp_path):
    """The launcher exits 0 at once; its two ranks (which would sleep 600 s) must be stopped by run_launch, not
    waited for: it returns within a minute and they are gone within the group's kill wait."""
    t = time.monotonic()
    res = run_launch(Launch([sys.executable, GANG, "launcher", "orphan", "-m", "gang-rank"], {}), lambda e: None,
                     log_file=tmp_path / "log", hang_timeout_s=60)
    took = time.monotonic() - t
    assert res.returncode == 0
    assert took < 60, f"run_launch returned after {took:.0f} s: it waited for the orphaned ranks to end"
    pids = pids_in([line for line in res.tail if "pid" in line])
    assert len(pids) == 3, res.tail  # the launcher and its two ranks
    try:
        wait_until(lambda: not [p for p in pids if alive(p)], processes.KILL_WAIT_S,
                   message=lambda: f"still running: {[p for p in pids if alive(p)]}")
    finally:
        processes.stop_pids([p for p in pids if alive(p)], 1.0)  # what a failure left


def test_torchrun_stops_the_gang_when_a_rank_dies(cpu_only, tmp_path):
    """accelerate launch --multi_gpu (torchrun) on CPU: rank 1 exits 1, torchrun stops rank 0 itself."""
    lw = build_launch(TrainSpec(strategy="ddp", processes_per_machine=2), tmp_path / "job.json")
    lw.argv[-3:] = ["-m", "tests.workers.torchrun_rank"]
    lw.env["GANG_TEST_DIR"] = str(tmp_path)
    t = time.monotonic()
    res = run_launch(lw, lambda e: None, log_file=tmp_path / "log", hang_timeout_s=120, cwd=REPO)
    took = time.monotonic() - t
    assert res.reason == "failed" and res.returncode != 0
    assert "rank 1 died (exit code 1)" in res.error and "simulated crash" in res.error
    log = (tmp_path / "log").read_text()
    # torchrun relays both ranks' output through one pipe: their lines may run together
    ranks = [int(pid) for pid in re.findall(r"rank \d pid (\d+)", log)]
    assert len(ranks) == 2 and not any(alive(p) for p in ranks)
    assert took < gang_mod.GANG_GRACE_S  # torchrun did it, not our fallback
    assert os.environ.get("PREFIXFLOW_FAULT") is None


def test_pipeline_refuses_multi_machine_training_with_guidance(tmp_path, monkeypatch):
    """train_prefix runs on the flow's machine: a multi-machine spec is refused (not retried) with a pointer
    to the Kubernetes / Slurm launch instead of waiting for machines that never come."""
    from prefixflow.launch.training import train
    from prefixflow.services.errors import TrainingError, is_user_error
    from prefixflow.services.preparation import PreparedData
    from prefixflow.services.spec import parse_spec

    monkeypatch.setenv("PREFIXFLOW_HOME", str(tmp_path))
    spec = parse_spec({"client": "acme", "task": "big", "base_model": str(tmp_path / "model"),
                       "data": {"source": str(tmp_path / "d.jsonl")},
                       "train": {"strategy": "ddp", "machines": 2, "processes_per_machine": 4, "batch_size": 8}})
    data = PreparedData(uri=str(tmp_path / "data"), fingerprint="f", cache_key="k", reused=False, counts={},
                        stats={}, rejected_uri=None, seconds=0.0)
    with pytest.raises(TrainingError, match=r"docs/scale-out\.md") as err:
        train(spec, data, "run")
    assert is_user_error(err.value) and not (tmp_path / "runs" / "acme" / "big" / "run" / "job.json").exists()


def test_text_init_defaults_to_the_tasks_own_targets(tmp_path):
    """``prefix.init: text`` without ``init_text``: the job takes its text from the first training targets
    (recorded in the artifact's prefix config), and a spec may leave it out."""
    from prefix_core import Example
    from prefix_core.data import init_text_from_targets
    from prefixflow.services.spec import PrefixSpec
    from support.pipeline import save_tiny_model

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"source": f"red {i}", "target": f"cat dog {i}"} for i in range(16)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = save_tiny_model(tmp_path / "model")
    job = TrainJob(base_model=str(model), data_dir=str(data), template="in: {source}\nout:", strategy="single",
                   prefix={"num_virtual_tokens": 4, "projection_hidden": None, "init": "text"},
                   train={"max_steps": 1, "batch_size": 4, "eval_every": 0, "checkpoint_every": 0,
                          "mixed_precision": "no"},
                   output_dir=str(tmp_path / "out")).to_json(tmp_path / "job.json")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # + the tests' step hook
    direct = Launch([sys.executable, "-m", "prefixflow.launch.train_job", str(job)], {"PYTHONPATH": path})
    res = run_launch(direct, lambda e: None, log_file=tmp_path / "log", cwd=REPO)
    assert res.returncode == 0, (tmp_path / "log").read_text()[-2000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    used = manifest["prefix_config"]["init_text"]
    assert used == init_text_from_targets([Example(r["source"], r["target"]) for r in rows], 4)
    assert used.startswith("cat dog 0 cat dog 1") and len(used) >= 4 * 8
    assert PrefixSpec(init="text").init_text is None
    with pytest.raises(ValueError, match=r"init_text is set but prefix\.init is 'random'"):
        PrefixSpec(init_text="hello")


def test_a_task_retried_after_its_training_landed_returns_what_that_training_did(tmp_path, monkeypatch):
    """The train task can fail after its job landed (the orchestrator's API times out on the way back) and be
    retried: the retry reuses the finished prefix and returns the outcome of the training that made it (resumed
    from step 3 after a killed rank, its usage), not an outcome with no resume and no cost."""
    from prefixflow.launch.training import train
    from prefixflow.services.preparation import prepare
    from prefixflow.services.spec import parse_spec
    from support.faults import kill_fault
    from support.pipeline import save_tiny_model, spec_dict, write_task

    monkeypatch.setenv("PREFIXFLOW_HOME", str(tmp_path / "state"))
    spec = parse_spec(spec_dict(save_tiny_model(tmp_path / "model"), write_task(tmp_path / "d.jsonl"), client="re"))
    data = prepare(spec)
    for key, value in kill_fault(0, 4, tmp_path / "killed").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match="rank 0 died"):
        train(spec, data, "r")
    landed = train(spec, data, "r")
    assert landed.resumed_from == 3 and landed.steps == 6 and landed.usage and landed.usage["tokens"] > 0
    again = train(spec, data, "r")  # the task retried once more, after the prefix was written
    assert again.artifact_uri == landed.artifact_uri
    keep = ("steps", "resumed_from", "usage", "launched_at", "finished_at", "final_train_loss", "precision")
    assert again.model_dump(include=set(keep)) == landed.model_dump(include=set(keep))


def test_a_training_whose_processes_hang_after_writing_the_prefix_lands(tmp_path, monkeypatch, caplog):
    """A rank that hangs in the job's teardown, after the prefix is written (CI saw a ddp launch do this under
    load): the group is stopped TEARDOWN_GRACE_S later and the training lands with its outcome, usage included,
    instead of failing and retrying a finished job."""
    from prefixflow.launch.training import train
    from prefixflow.services.preparation import prepare
    from prefixflow.services.spec import parse_spec
    from support.faults import linger_fault
    from support.pipeline import save_tiny_model, spec_dict, write_task

    monkeypatch.setattr(gang_mod, "TEARDOWN_GRACE_S", 2.0)
    monkeypatch.setenv("PREFIXFLOW_HOME", str(tmp_path / "state"))
    spec = parse_spec(spec_dict(save_tiny_model(tmp_path / "model"), write_task(tmp_path / "d.jsonl"), client="lg"))
    for key, value in linger_fault(0, 6).items():
        monkeypatch.setenv(key, value)
    t = time.monotonic()
    with caplog.at_level("WARNING"):
        landed = train(spec, prepare(spec), "r")
    assert landed.steps == 6 and landed.usage and landed.usage["tokens"] > 0
    assert "the prefix is complete and kept" in caplog.text
    assert time.monotonic() - t < spec.train.hang_timeout_s
    recalled = json.loads((Path(landed.run_dir) / "outcome.json").read_text())
    assert recalled["usage"] == landed.usage
