"""Warm start vs cold start on E2E NLG (issue 26): a champion trained on half of the training rows, then the
full training set arrives. Both retrainings run the same number of steps (500) with one seed and are scored
with greedy decoding.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_warm_start.py --steps 500 --limit-test 200

Smoke run: ``--steps 20 --limit-test 10 --out /tmp/warm_smoke.json``.

What it does, all in one process on SmolLM2-135M-Instruct (fp32, the prefix_core API the pipeline's job uses):

1. E2E ``devset.csv`` split by ``mr`` into train/validation (90/10, seed 0, as ``bench_e2e_quality.py``); the
   champion's rows are the train rows of a seeded half of the train MRs.
2. champion: P=10, MLP 512, ``--steps`` steps on that half.
3. cold: a new prefix (the same seed), ``--steps`` steps on all train rows.
4. warm: ``PrefixModel.warm_start(champion's artifact)`` (embedding and MLP), then ``--steps`` steps on all train
   rows, the same schedule as cold (warmup, linear decay, learning rate).
5. validation loss every ``--eval-every`` steps for both (the same validation rows); the warm run's loss at
   step 0 is the champion's best (the state it starts from); "steps to match" is the first validation step after
   training began at which warm is at or below cold's final validation loss (target: at most 30% of the steps).
6. BLEU (sacrebleu, all references of each test MR) of champion, cold and warm at the end, greedy, on the first
   ``--limit-test`` test MRs (target: warm not lower than cold).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_e2e_quality import (  # noqa: E402
    MODEL,
    ROOT,
    TEMPLATE,
    bleu,
    clean,
    first_refs,
    git_state,
    group_refs,
    length_order,
    log,
    machine_info,
    read_csv,
    run_in_order,
    split_by_mr,
    stop_token_ids,
)

from prefix_core import MultiPrefixGenerator, PrefixConfig, PrefixModel, TrainConfig, load_base_model  # noqa: E402
from prefix_core.train import train_prefix  # noqa: E402


def half_by_mr(rows: list, seed: int) -> list:
    """The rows of a seeded half of the sources (no source split between the halves)."""
    sources = sorted({e.source for e in rows})
    random.Random(seed).shuffle(sources)
    keep = set(sources[: len(sources) // 2])
    return [e for e in rows if e.source in keep]


def trained(name: str, model: PrefixModel, tok, rows, val, cfg: TrainConfig) -> dict:
    """Train ``model`` and return its validation curve, seconds and result."""
    curve: list[tuple[int, float]] = []

    def on_event(e: dict) -> None:
        if e.get("event") == "eval":
            curve.append((e["step"], e["eval_loss"]))
            log(f"{name} step {e['step']}: validation loss {e['eval_loss']:.4f}")

    t0 = time.time()
    res = train_prefix(model, tok, rows, TEMPLATE, cfg, eval_examples=val, callbacks=[on_event])
    return {"curve": curve, "seconds": time.time() - t0, "final_train_loss": res.final_train_loss,
            "best_eval_loss": res.best_eval_loss}


def steps_to_match(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first validation step after training began (step > 0) at which the loss is at or below ``target``:
    the first update restarts the learning-rate schedule, which can lift a warm start above where it began."""
    return next((step for step, loss in curve if step > 0 and loss <= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--champion-steps", type=int, default=0, help="steps of the champion (0: --steps)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--limit-test", type=int, default=200, help="score the first N test MRs (0 = all 630)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gen-batch-size", type=int, default=32)
    ap.add_argument("--val-refs-per-mr", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "e2e")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "warm_start.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.time()
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_warm_start.py " + " ".join(sys.argv[1:])
    log(f"command: {command}; {git_state()}")

    dev_rows = read_csv(args.data / "devset.csv")
    train_ex, val_ex, _, _ = split_by_mr(dev_rows, 0.1, args.seed)
    val_ex = first_refs(val_ex, args.val_refs_per_mr)
    half = half_by_mr(train_ex, args.seed)
    test_groups = group_refs(read_csv(args.data / "testset_w_refs.csv"))
    test_mrs = list(test_groups)[: args.limit_test or None]
    test_refs = [test_groups[m] for m in test_mrs]
    prompts = [TEMPLATE.format(source=m) for m in test_mrs]
    log(f"champion rows {len(half)}, all train rows {len(train_ex)}, validation rows {len(val_ex)}, "
        f"test MRs {len(test_mrs)}")

    base, tok = load_base_model(MODEL)
    stop_ids = stop_token_ids(tok)
    prefix = PrefixConfig(num_virtual_tokens=10, projection_hidden=512, seed=args.seed)

    def config(steps: int) -> TrainConfig:
        return TrainConfig(max_steps=steps, batch_size=args.batch_size, learning_rate=args.lr, mixed_precision="no",
                           eval_every=args.eval_every, log_every=args.eval_every, seed=args.seed)

    systems: dict[str, dict] = {}
    champion = PrefixModel(base, prefix)
    systems["champion"] = trained("champion", champion, tok, half, val_ex, config(args.champion_steps or args.steps))
    champion_art = champion.export(prompt_template=TEMPLATE)
    artifacts = {"champion": champion_art}

    cold = PrefixModel(base, prefix)
    systems["cold"] = trained("cold", cold, tok, train_ex, val_ex, config(args.steps))
    artifacts["cold"] = cold.export(prompt_template=TEMPLATE)

    warm = PrefixModel(base, prefix)
    warm.warm_start(champion_art)
    # before any update the warm prefix is the champion's best state: its validation loss is the champion's best
    # (equal to 1e-6, tests/test_warm_start.py)
    step0 = systems["champion"]["best_eval_loss"]
    systems["warm"] = trained("warm", warm, tok, train_ex, val_ex, config(args.steps))
    systems["warm"]["curve"].insert(0, (0, step0))
    artifacts["warm"] = warm.export(prompt_template=TEMPLATE)

    target = systems["cold"]["curve"][-1][1]
    match = steps_to_match(systems["warm"]["curve"], target)
    gen = MultiPrefixGenerator(base, tok, artifacts)
    order = length_order(tok, prompts)
    for name in artifacts:
        t0 = time.time()
        raw = run_in_order(prompts, order, args.gen_batch_size,
                           lambda ps, n=name: gen.generate([(n, p) for p in ps], max_new_tokens=args.max_new_tokens,
                                                           do_sample=False, eos_token_id=stop_ids))
        score, signature = bleu([clean(t) for t in raw], test_refs)
        systems[name].update(bleu=round(score.score, 2), bleu_signature=signature, decode_s=time.time() - t0)
        log(f"{name}: BLEU {score.score:.2f} ({time.time() - t0:.0f} s)")

    result = {
        "command": command, "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "code": git_state(), "machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
        "rows": {"champion": len(half), "all": len(train_ex), "validation": len(val_ex), "test_mrs": len(test_mrs)},
        "cold_final_eval_loss": target, "warm_step0_eval_loss": step0,
        "warm_below_cold_final_at_step0": step0 <= target,
        "warm_steps_to_match_cold": match,
        "warm_steps_to_match_fraction": None if match is None else match / args.steps,
        "targets": {"steps_fraction_at_most": 0.30, "warm_bleu_not_lower": True},
        "met": {"steps": match is not None and match / args.steps <= 0.30,
                "bleu": systems["warm"]["bleu"] >= systems["cold"]["bleu"]},
        "systems": systems, "seconds": time.time() - t_all,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    log(json.dumps({k: result[k] for k in ("cold_final_eval_loss", "warm_step0_eval_loss", "warm_steps_to_match_cold",
                                           "warm_steps_to_match_fraction", "met")}))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
