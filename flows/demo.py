"""The main job on embedded defaults: the whole pipeline (data → training → evaluation → registry) for
a generated task on SmolLM2-135M, with an ephemeral Prefect API and a local MLflow store under one
state folder; then ``@champion`` is pulled from the registry and compared with the bare model.
No server, no GPU, no account."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from prefix_core import DEFAULT_MODEL
from prefixflow.flows.demo_task import TEMPLATE, split
from prefixflow.flows.embedded import use_embedded_prefect
from prefixflow.services.run import RunResult
from prefixflow.services.spec import parse_spec

# Deferred imports: Prefect and everything that loads it (the pipeline flow), prefix_core (torch) and the registry are
# deferred on purpose: Prefect reads its settings once, when imported, and use_embedded_prefect() must make them
# first.

CLIENT, TASK = "demo", "restaurants"


def demo_spec(state: Path, steps: int, model: str, strategy: str = "single", processes: int = 1):
    """The demo's pipeline spec (its data written under ``state/input``); ``strategy``/``processes`` pick
    how training is launched (the prefix is the same up to floating-point noise)."""

    train, val, test = split(seed=0)
    folder = state / "input"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("records.jsonl", train + val), ("held_out.jsonl", test)):
        with open(folder / name, "w") as fh:
            fh.writelines(json.dumps({"record": e.source, "description": e.target}) + "\n" for e in rows)
    return parse_spec({
        "client": CLIENT, "task": TASK, "base_model": model,
        "data": {"source": str(folder / "records.jsonl"), "test_source": str(folder / "held_out.jsonl"),
                 "source_column": "record", "target_column": "description", "template": TEMPLATE,
                 "validation_fraction": 0.05},
        "prefix": {"num_virtual_tokens": 10, "projection_hidden": 512},
        # Precision follows the hardware (bf16 only where native). Training stops on a validation plateau:
        # the demo task is learned in 30-40 steps (validation loss below 0.01), far before the step budget.
        "train": {"max_steps": steps, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 10,
                  "mixed_precision": "auto", "eval_every": 5, "early_stopping_patience": 2,
                  "early_stopping_min_delta": 0.01, "checkpoint_every": 50, "strategy": strategy,
                  "processes_per_machine": processes},
        "evaluate": {"metrics": ["bleu", "exact_match"], "max_new_tokens": 40, "batch_size": 30,
                     "gate": {"metric": "bleu", "min_gain_over_baseline": 10.0, "min_gain_over_champion": 0.0}},
    }, "demo spec")


@dataclass
class DemoResult:
    pipeline: RunResult
    pulled: Path
    pulled_alias: str
    rows: list[tuple[str, str, str, str]]  # source, no prefix, pulled prefix, reference
    exact_before: float
    exact_after: float


def run_demo(state: Path, steps: int = 150, model: str = DEFAULT_MODEL, fresh: bool = False,
             strategy: str = "single", processes: int = 1) -> DemoResult:
    """Run the pipeline on the demo task, pull the registered prefix and generate with and without it.
    Reruns reuse the finished run (``fresh=True`` trains a new version)."""

    use_embedded_prefect(state)
    from prefix_core import MultiPrefixGenerator, PrefixArtifact, load_base_model
    from prefix_core.precision import decide
    from prefixflow.flows.pipeline import prefix_pipeline
    from prefixflow.services import registry

    spec = demo_spec(state, steps, model, strategy, processes)
    run_key = f"demo-{spec.spec_hash()}" + (f"-{uuid.uuid4().hex[:8]}" if fresh else "")
    result = prefix_pipeline(spec, run_key=run_key)
    alias = "champion" if result.registration.champion else "candidate"
    pulled = registry.download(f"{CLIENT}/{TASK}@{alias}", state / alias)
    _, _, test = split(seed=0)
    base, tok = load_base_model(model, dtype=decide("auto", "cpu").dtype)
    gen = MultiPrefixGenerator(base, tok, {"pulled": PrefixArtifact.load(pulled)})
    texts = [t.strip().split("\n")[0] for t in gen.generate(
        [(n, TEMPLATE.format(source=e.source)) for n in (None, "pulled") for e in test], max_new_tokens=40,
        do_sample=False)]
    before, after = texts[: len(test)], texts[len(test) :]
    rows = [(e.source, b, a, e.target) for e, b, a in zip(test, before, after, strict=True)]
    exact = [sum(t == e.target for t, e in zip(x, test, strict=True)) / len(test) for x in (before, after)]
    return DemoResult(result, pulled, alias, rows, *exact)
