"""Orchestration overhead of the pipeline on the demo job (issue target: at most 10%).

overhead = (flow wall time - time inside data preparation, training and evaluation) / flow wall time,
where the flow wall time runs from the flow function's start to its return (every Prefect task
transition, the MLflow run, registration and the summary artifact count as overhead; the training
subprocess's start-up, model load and checkpoints count as training). Also reported: the ephemeral
Prefect API start-up before the flow, and the whole command's wall time.

Exact command of the reported run (fresh state folder, embedded Prefect and MLflow, 2-core CPU):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_orchestration.py --steps 150 --runs 2

Run 1 trains version 1 (no champion yet); run 2 is a new pipeline run of the same spec (``fresh``):
it reuses the prepared data, trains version 2 and evaluates it against the baseline and the champion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--runs", type=int, default=2, help="run 1 trains; later runs rerun with --fresh")
    ap.add_argument("--state", type=Path, default=None, help="state folder (default: a new temporary one)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/orchestration.json"))
    args = ap.parse_args()
    state = args.state or Path(tempfile.mkdtemp(prefix="prefixflow-bench-"))
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        os.environ.pop(var, None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from prefixflow.flows.demo import run_demo
    from prefixflow.flows.embedded import use_embedded_prefect

    use_embedded_prefect(state)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    runs = []
    for i in range(args.runs):
        t0 = time.time()
        result = run_demo(state, steps=args.steps, fresh=i > 0)
        t = result.pipeline.timings
        record = {
            "run": i + 1, "fresh_version": i > 0, "command_wall_s": round(time.time() - t0, 2),
            **{f"{k}_s": round(v, 2) for k, v in t.items()},
            "overhead_share": round(t["orchestration"] / t["total"], 4),
            "version": result.pipeline.registration.version, "data_reused": result.pipeline.data.reused,
            "bleu_candidate": result.pipeline.report.metrics["candidate"]["bleu"],
            "bleu_baseline": result.pipeline.report.metrics["baseline"]["bleu"],
            "exact_before": result.exact_before, "exact_after": result.exact_after,
        }
        runs.append(record)
        print(json.dumps(record), flush=True)
    out = {"benchmark": "orchestration overhead, demo job", "steps": args.steps, "runs": runs,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    if args.state is None:
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
