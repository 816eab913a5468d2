"""Training throughput per strategy (single / ddp / ZeRO-2 / ZeRO-3) on CPU, and the cost of a resume.

The same job for every strategy: the embedded SmolLM2-135M-Instruct, fp32, the first ``--rows`` rows of
E2E ``devset.csv`` (read in place), prefix of 10 virtual tokens with a 512-wide MLP, global batch 8,
``--steps`` optimizer steps, one ``accelerate launch`` of ``prefixflow.launch.train_job`` (exactly what the pipeline
runs; 2 processes with 1 CPU thread each for ddp/ZeRO, 1 process with 2 threads for single).

Per strategy it reports:

* tokens/s: input tokens of the global batches (prefix excluded) over the wall time between the
  step-2 and the last step event (the first two steps warm up);
* start-up: seconds from the launch to the first step event (imports, model load, rendezvous,
  DeepSpeed engine);
* resume cost: the job is launched again with a checkpoint every 4 steps, one rank is SIGKILLed after
  step 6, and the same job is relaunched: seconds from the relaunch to the first new step (step 5),
  and to the ``resume`` event. Work lost = the steps redone (here 2).

Exact command of the reported run (nothing else running, 2-core CPU):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_strategies.py --steps 12
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefixflow.launch.command import build_launch  # noqa: E402
from prefixflow.launch.gang import run_launch  # noqa: E402
from prefixflow.launch.train_job import TrainJob  # noqa: E402
from prefixflow.services.spec import TrainSpec  # noqa: E402

STRATEGIES = ["single", "ddp", "deepspeed-zero2", "deepspeed-zero3"]
TEMPLATE = "Describe the restaurant: {source}\nDescription:"


def write_data(src: Path, folder: Path, rows: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(src, newline="", encoding="utf-8") as f:
        records = [{"source": r["mr"], "target": " " + r["ref"]} for r in csv.DictReader(f)][:rows]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def make_job(work: Path, name: str, strategy: str, steps: int, checkpoint_every: int) -> Path:
    run = work / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    train = {"max_steps": steps, "batch_size": 8, "grad_accum": 1, "learning_rate": 3e-3, "log_every": 1,
             "checkpoint_every": checkpoint_every, "eval_every": 0, "mixed_precision": "no", "max_length": 64,
             "keep_checkpoints": 2}
    job = TrainJob(base_model="smollm2-135m", data_dir=str(work / "data"), template=TEMPLATE,
                   prefix={"num_virtual_tokens": 10, "projection_hidden": 512}, train=train, strategy=strategy,
                   checkpoint_dir=str(run / "ckpt"), output_dir=str(run / "prefix"),
                   manifest_fields={"client": "bench", "task": "strategies"})
    return job.to_json(run / "job.json")


def timed_launch(job_file: Path, strategy: str, fault: str | None = None) -> tuple[float, list, str]:
    """Run one launch; returns (start time, [(arrival time, event)], how it ended)."""
    spec = TrainSpec(strategy=strategy, processes_per_machine=1 if strategy == "single" else 2, mixed_precision="no")
    launch = build_launch(spec, job_file)
    if fault:
        launch.env["PREFIXFLOW_FAULT"] = fault
    events: list[tuple[float, dict]] = []
    t0 = time.time()
    result = run_launch(launch, lambda e: events.append((time.time(), e)), log_file=job_file.parent / "launch.log",
                        hang_timeout_s=600, cwd=ROOT)
    if fault is None and result.reason != "ok":
        raise SystemExit(f"{strategy}: launch {result.reason}: {result.error}\n" + "\n".join(result.tail))
    return t0, events, result.reason


def steps_of(events: list[tuple[float, dict]]) -> list[tuple[float, dict]]:
    return [(t, e) for t, e in events if e.get("event") == "step"]


def throughput(work: Path, strategy: str, steps: int) -> dict:
    job = make_job(work, f"fresh-{strategy}", strategy, steps, checkpoint_every=0)
    t0, events, _ = timed_launch(job, strategy)
    st = steps_of(events)
    t_warm = next(t for t, e in st if e["step"] == 2)
    t_last = st[-1][0]
    # Tokens per step are not in the event; tokens_per_s x the step's own window (log_every=1) is.
    windows = [(t - prev_t, e) for (prev_t, _), (t, e) in itertools.pairwise(st)]
    tokens = sum(e["tokens_per_s"] * dt for dt, e in windows if e["step"] > 2)
    return {"tokens_per_s": round(tokens / (t_last - t_warm), 1), "startup_s": round(st[0][0] - t0, 1),
            "step_s": round((t_last - t_warm) / (steps - 2), 3), "wall_s": round(time.time() - t0, 1)}


def resume_cost(work: Path, strategy: str) -> dict:
    job = make_job(work, f"resume-{strategy}", strategy, steps=8, checkpoint_every=4)
    once = job.parent / "killed-once"
    rank = 0 if strategy == "single" else 1
    _, events, reason = timed_launch(job, strategy, fault=f"kill:{rank}:6:{once}")
    assert reason != "ok" and once.exists(), f"{strategy}: the fault did not fire ({reason})"
    t0, events, reason = timed_launch(job, strategy)
    assert reason == "ok"
    resumed = [(t, e) for t, e in events if e.get("event") == "resume"]
    first = steps_of(events)[0]
    assert resumed and resumed[0][1]["step"] == 4 and first[1]["step"] == 5, (resumed, first)
    return {"relaunch_to_resume_event_s": round(resumed[0][0] - t0, 1),
            "relaunch_to_first_new_step_s": round(first[0] - t0, 1), "steps_redone": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "e2e" / "devset.csv")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "strategies_cpu.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prefixflow-strategies-"))
    write_data(args.data, work / "data", args.rows)
    results = {}
    for strategy in args.strategies:
        r = throughput(work, strategy, args.steps)
        print(f"{strategy}: {r}", flush=True)
        r.update(resume_cost(work, strategy))
        print(f"{strategy}: {r}", flush=True)
        results[strategy] = r
    out = {"command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_strategies.py " + " ".join(sys.argv[1:]),
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
           "cpus": __import__("os").cpu_count(), "job": {"model": "smollm2-135m", "dtype": "fp32", "global_batch": 8,
                                                         "max_length": 64, "virtual_tokens": 10, "steps": args.steps},
           "results": results}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
