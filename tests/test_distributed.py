"""The launched training job under single / DDP / DeepSpeed ZeRO-2 / ZeRO-3 (2 CPU processes, gloo).

Every run is a real ``accelerate launch`` of ``prefixflow.launch.train_job`` on a tiny random llama (saved with
save_pretrained) and the char tokenizer, fp32, 8 steps. What is checked:

* all strategies fold to the same prefix at the same global batch (measured: max abs diff about
  3e-7 against single for ddp, zero2 and zero3; asserted <= 1e-5);
* SIGKILL of one rank mid-run tears the gang down, and relaunching the same job resumes from the
  last complete checkpoint to exactly the uninterrupted prefix (measured 0.0; asserted <= 1e-6),
  for all four strategies (ZeRO-3 with every parameter partitioned, prefix included);
* incomplete and corrupt checkpoints are skipped with a warning, also when only one rank cannot
  read its part (all ranks then agree on an older one); a checkpoint of another strategy is refused
  as a user error;
* a user error raised on every rank ends the launch as ``user_error``.

The first DeepSpeed launch on a machine JIT-compiles DeepSpeed's shm_comm op (about 25-50 s, cached
in TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from prefix_core import PrefixArtifact
from prefix_core import checkpoint as ckpt
from prefixflow.launch.command import build_launch
from prefixflow.launch.gang import run_launch
from prefixflow.launch.train_job import TrainJob
from prefixflow.services.spec import TrainSpec
from support.faults import FAULT_ENV
from support.pipeline import survivors
from support.tiny_models import char_tokenizer, make_base

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ["single", "ddp", "deepspeed-zero2", "deepspeed-zero3"]
# fp32 whatever the CPU: under bf16 autocast (``auto`` picks it where bf16 is native, e.g. AVX512-BF16) the ranks'
# half batches round differently from one whole batch, and the strategies no longer agree to 1e-5.
TRAIN = {"max_steps": 8, "batch_size": 8, "grad_accum": 2, "learning_rate": 1e-2, "log_every": 2,
         "checkpoint_every": 4, "eval_every": 4, "keep_checkpoints": 2, "mixed_precision": "no"}
PREFIX = {"num_virtual_tokens": 3, "projection_hidden": 16}
TEMPLATE = "n {source} :"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    make_base("llama").save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    (root / "data").mkdir()
    _write_jsonl(root / "data" / "train.jsonl",
                 [{"source": f"{i}", "target": ["aaa", "bbb", "ccc"][i % 3] + " " * (i % 4)} for i in range(48)])
    # 9 rows: the two ranks evaluate 5 and 4, so one of them runs a throw-away batch.
    _write_jsonl(root / "data" / "validation.jsonl",
                 [{"source": f"{i}", "target": ["aaa", "bbb", "ccc"][i % 3]} for i in range(9)])
    # ZeRO-3 with every parameter partitioned (the default threshold would keep tiny ones whole).
    z3 = json.loads((REPO / "infra" / "deepspeed" / "zero3.json").read_text())
    z3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "zero3-all.json").write_text(json.dumps(z3))
    return root


def make_job(work: Path, name: str, strategy: str, **train) -> Path:
    run = work / "runs" / name
    job = TrainJob(base_model=str(work / "model"), data_dir=str(work / "data"), template=TEMPLATE,
                   prefix=PREFIX, train={**TRAIN, **train}, strategy=strategy,
                   checkpoint_dir=str(run / "ckpt"), output_dir=str(run / "prefix"),
                   manifest_fields={"client": "acme", "task": "e2e", "data_fingerprint": "abc123"})
    return job.to_json(run / "job.json")


def launch(work: Path, job_file: Path, strategy: str, fault: str | None = None):
    spec = TrainSpec(strategy=strategy, processes_per_machine=1 if strategy == "single" else 2,
                     mixed_precision="no")
    lw = build_launch(spec, job_file)
    if strategy == "deepspeed-zero3":
        i = lw.argv.index("--deepspeed_config_file")
        lw.argv[i + 1] = str(work / "zero3-all.json")
    if fault:
        lw.env[FAULT_ENV] = fault
    events: list[dict] = []
    res = run_launch(lw, events.append, log_file=job_file.parent / "launch.log", hang_timeout_s=240, cwd=REPO)
    return res, events


def table(path) -> torch.Tensor:
    return PrefixArtifact.load(path).table()


_REFERENCES: dict[str, tuple] = {}


def reference(work: Path, strategy: str):
    """The uninterrupted run of ``strategy`` (launched once per module)."""
    if strategy not in _REFERENCES:
        job = make_job(work, f"ref-{strategy}", strategy)
        res, events = launch(work, job, strategy)
        assert res.reason == "ok", (res.error, res.tail)
        _REFERENCES[strategy] = (job, events, table(job.parent / "prefix"))
    return _REFERENCES[strategy]


# --- fast ------------------------------------------------------------------------------------------
def test_stale_extension_build_lock_is_removed(tmp_path, monkeypatch):
    """A launch killed while DeepSpeed JIT-built its op left NAME/lock: later builds would wait forever."""
    from prefixflow.launch.train_job import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "deepspeed_shm_comm" / "lock"  # torch's layout under TORCH_EXTENSIONS_DIR
    fresh = tmp_path / "other_op" / "lock"  # a build running right now
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    os.utime(stale, (1_000_000, 1_000_000))
    assert clear_stale_build_locks(max_age_s=1800) == [stale]
    assert not stale.exists() and fresh.exists()
    assert (stale.parent).is_dir()  # only the lock goes; a finished build stays cached


def test_train_job_json_round_trip(tmp_path):
    job = TrainJob(base_model="smollm2-135m", data_dir="/d", template="{source}", prefix={"num_virtual_tokens": 4},
                   train={"max_steps": 3}, strategy="ddp", checkpoint_dir="/c", output_dir="/o",
                   manifest_fields={"client": "x"})
    assert TrainJob.from_json(job.to_json(tmp_path / "a" / "job.json")) == job
    (tmp_path / "bad.json").write_text(json.dumps({**json.loads((tmp_path / "a" / "job.json").read_text()),
                                                   "epochs": 3}))
    with pytest.raises(ValueError, match="unknown fields"):
        TrainJob.from_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="strategy"):
        TrainJob(base_model="m", data_dir="/d", template="{source}", strategy="fsdp", output_dir="/o")


# --- launched --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_single_run_reports_events_and_writes_the_artifact(work):
    job, events, _ = reference(work, "single")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "loaded" and kinds[-3:] == ["end", "artifact", "usage"]  # the work first, then its cost
    usage = events[-1]  # what the job cost (launch.usage)
    assert usage["processes"] == 1 and usage["tokens"] > 0 and usage["cpu_s"] > 0 and usage["gpu_s"] == 0
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [4, 8]
    assert [e["step"] for e in events if e["event"] == "eval"] == [4, 8]
    art = PrefixArtifact.load(events[-2]["path"])
    assert art.manifest["client"] == "acme" and art.manifest["data_fingerprint"] == "abc123"
    assert art.manifest["training"]["strategy"] == "single" and art.manifest["training"]["steps"] == 8
    assert art.prompt_template == TEMPLATE
    assert [p.name for p in ckpt.complete_checkpoints(job.parent / "ckpt")] == ["step-00000008", "step-00000004"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed-zero2", "deepspeed-zero3"])
def test_strategies_give_the_same_prefix(work, strategy):
    _, single_events, single = reference(work, "single")
    job, events, folded = reference(work, strategy)
    assert next(e for e in events if e["event"] == "loaded")["processes"] == 2
    diff = (folded - single).abs().max().item()
    assert diff <= 1e-5, f"{strategy} vs single: max abs diff {diff:.3g}"
    end, single_end = (next(e for e in evs if e["event"] == "end") for evs in (events, single_events))
    usage = next(e for e in events if e["event"] == "usage")  # summed over both ranks
    assert usage["processes"] == 2 and usage["cpu_s"] > 0 and usage["tokens"] == events[-3]["train_tokens"]
    assert abs(end["final_train_loss"] - single_end["final_train_loss"]) < 1e-5
    assert abs(end["best_eval_loss"] - single_end["best_eval_loss"]) < 1e-5
    if strategy.startswith("deepspeed"):
        shards = job.parent / "ckpt" / "step-00000008" / ckpt.DEEPSPEED_DIR / "state"
        assert sorted(p.name for p in shards.glob("zero_pp_rank_*_optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    if strategy == "deepspeed-zero3":  # the prefix itself was partitioned: each rank holds half
        state = torch.load(shards / "zero_pp_rank_1_mp_rank_00_optim_states.pt", weights_only=False)
        numel = sum(t.numel() for t in state["optimizer_state_dict"]["fp32_flat_groups"])
        assert numel == 1400  # 2800 trainable parameters / 2 ranks


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kill_one_rank_and_resume_exactly(work, strategy):
    _, _, uninterrupted = reference(work, strategy)
    job = make_job(work, f"kill-{strategy}", strategy)
    victim = 0 if strategy in ("single", "deepspeed-zero3") else 1
    res, events = launch(work, job, strategy, fault=f"kill:{victim}:6")
    assert res.reason == "failed" and "SIGKILL" in res.error, (res.error, res.tail)
    assert f"rank {victim} died" in res.error
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [4]
    assert not any(e["event"] == "artifact" for e in events)
    assert survivors(job) == []

    res, events = launch(work, job, strategy)
    assert res.reason == "ok", (res.error, res.tail)
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["step"] == 4
    end = next(e for e in events if e["event"] == "end")
    assert end["steps"] == 8 and end["resumed_from"] == 4
    diff = (table(job.parent / "prefix") - uninterrupted).abs().max().item()
    assert diff <= 1e-6, f"{strategy}: resumed vs uninterrupted max abs diff {diff:.3g}"
    assert survivors(job) == []


@pytest.mark.slow
def test_incomplete_and_corrupt_checkpoints_are_skipped(work):
    _, _, uninterrupted = reference(work, "ddp")
    job = make_job(work, "corrupt-ddp", "ddp", checkpoint_every=2, keep_checkpoints=5)
    res, _ = launch(work, job, "ddp", fault="kill:1:7")
    assert res.reason == "failed"
    root = job.parent / "ckpt"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-00000006", "step-00000004", "step-00000002"]
    half = root / "step-00000008"  # a save cut short: no COMPLETE marker
    half.mkdir()
    (half / "state.json").write_text(json.dumps({"step": 8}))
    (root / "step-00000006" / "trainable.safetensors").write_bytes(b"garbage")  # corrupt for every rank
    (root / "step-00000004" / "rng-rank1.safetensors").write_bytes(b"garbage")  # corrupt for rank 1 only

    res, events = launch(work, job, "ddp")
    assert res.reason == "ok", (res.error, res.tail)
    assert next(e for e in events if e["event"] == "resume")["step"] == 2
    log = (job.parent / "launch.log").read_text()
    assert "skipping checkpoint" in log and "step-00000006" in log and "step-00000004" in log
    assert (table(job.parent / "prefix") - uninterrupted).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_user_error_on_every_rank(work):
    job = make_job(work, "bad-batch", "ddp", batch_size=6, grad_accum=2)  # 6 is not a multiple of 2 x 2
    res, _ = launch(work, job, "ddp")
    assert res.reason == "user_error" and "multiple of processes x grad_accum" in res.error
    assert survivors(job) == []


@pytest.mark.slow
def test_checkpoint_of_another_strategy_is_refused(work):
    ddp_job, _, _ = reference(work, "ddp")
    job = make_job(work, "ddp-to-zero2", "deepspeed-zero2")
    shutil.copytree(ddp_job.parent / "ckpt", job.parent / "ckpt")
    res, _ = launch(work, job, "deepspeed-zero2")
    assert res.reason == "user_error", (res.error, res.tail)
    assert "was written by DDP/single with 2 process(es)" in res.error and "ZeRO-2" in res.error
    assert survivors(job) == []
