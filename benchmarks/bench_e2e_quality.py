"""E2E NLG quality benchmark: our prefix vs PEFT's prefix vs the bare base model (SmolLM2-135M-Instruct).

Exact command of the reported run (2-core shared CPU; one torch thread, because another benchmark shared
the two cores and two threads per process were 4-5x slower under that contention):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_e2e_quality.py --steps 300 --threads 1

Smoke run (a few minutes; --out elsewhere so the reported results stay):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_e2e_quality.py --steps 10 --limit-test 20 --threads 1 \
        --out /tmp/e2e_quality_smoke.json

Data (read in place, never copied): ``--data``, by default ``../shared/data/e2e`` next to the checkout.
``devset.csv`` is split by ``mr`` (no meaning representation in both parts) into train/validation (90/10,
seeded); the test set is the 630 distinct ``mr`` of ``testset_w_refs.csv``, scored with sacrebleu corpus
BLEU against all of each mr's references (reference lists padded with None, which sacrebleu skips).

Systems, all with the template ``Table: {source}\\nSentence:`` and the target `` " " + ref + EOS``:

1. ours: ``PrefixModel(base, PrefixConfig(num_virtual_tokens=10, projection_hidden=512))`` trained with
   ``train_prefix`` (``TrainConfig(mixed_precision=--precision)``; with bf16 the trainer runs forward and loss
   under ``torch.autocast("cpu", dtype=torch.bfloat16)``; fp32 weights and optimizer state), decoded with
   ``MultiPrefixGenerator`` (HF ``generate``, greedy).
2. PEFT: ``PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10, prefix_projection=True,
   encoder_hidden_size=512)`` on a separately loaded base; a loop of ours with the *same batches in the
   same order* (``length_grouped_batches`` with the trainer's seed), AdamW (weight decay 0), linear
   schedule without warmup, grad clip 1.0, loss = summed target-token cross-entropy / target tokens, the
   forward in the same precision as ours (``--precision``, default auto: bf16 autocast only where the CPU
   computes bf16 natively) and the loss in fp32. Decoded with a
   manual greedy loop started from PEFT's ``get_prompt(batch_size)`` cache, because with transformers
   5.24 ``PeftModel.generate()`` silently drops the prefix. The loop is checked against HF ``generate()``
   on the bare model first.
3. base: the same frozen model with no prefix (``MultiPrefixGenerator`` with the ``None`` prefix).

Decoding for all three is greedy, fp32 weights without autocast, left padding, batched,
``--max-new-tokens`` (64), stopping at EOS or at any token that contains a newline; the generated text
is cut at its first newline and stripped (stopping there gives the same text, only sooner).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sacrebleu
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache, get_linear_schedule_with_warmup

from prefix_core import (
    Example,
    MultiPrefixGenerator,
    PrefixConfig,
    PrefixModel,
    TrainConfig,
    load_base_model,
    train_prefix,
)
from prefix_core.base_model import resolve_model_path
from prefix_core.data import collate, encode, length_grouped_batches, target_token_count
from prefix_core.precision import decide
from prefixflow.services.metrics import reference_streams

TEMPLATE = "Table: {source}\nSentence:"
MODEL = "smollm2-135m"
ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- data ---------------------------------------------------------------------------------------
def read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [(row["mr"].strip(), row["ref"].strip()) for row in csv.DictReader(fh)]


def group_refs(rows: list[tuple[str, str]]) -> OrderedDict[str, list[str]]:
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for mr, ref in rows:
        groups.setdefault(mr, []).append(ref)
    return groups


def split_by_mr(rows, val_frac: float, seed: int):
    groups = group_refs(rows)
    mrs = list(groups)
    random.Random(seed).shuffle(mrs)
    n_val = max(1, round(len(mrs) * val_frac))
    val_mrs = set(mrs[:n_val])
    train = [Example(mr, ref) for mr, ref in rows if mr not in val_mrs]
    val = [Example(mr, ref) for mr, ref in rows if mr in val_mrs]
    assert not ({e.source for e in train} & {e.source for e in val})
    return train, val, len(mrs) - n_val, n_val


def first_refs(examples: list[Example], k: int) -> list[Example]:
    """The first ``k`` examples of every source."""
    count: dict[str, int] = {}
    out = []
    for e in examples:
        count[e.source] = count.get(e.source, 0) + 1
        if count[e.source] <= k:
            out.append(e)
    return out


def bleu(hyps: list[str], refs: list[list[str]]):
    metric = sacrebleu.BLEU()
    score = metric.corpus_score(hyps, reference_streams(refs))
    return score, str(metric.get_signature())


def clean(text: str) -> str:
    """The output sentence: the generated text up to its first newline, stripped."""
    return text.split("\n")[0].strip()


def stop_token_ids(tok) -> list[int]:
    """EOS and every token whose text contains a newline: decoding stops at either, which is the same as
    cutting the greedy output at its first newline (``clean``) but cheaper (the bare model rarely stops)."""
    ids = {i for i in range(len(tok)) if "\n" in tok.decode([i])}
    return sorted(ids | {tok.eos_token_id})


# --- PEFT training ------------------------------------------------------------------------------
def token_loss_sum(model, batch: dict, autocast: bool) -> tuple[torch.Tensor, int]:
    """Same loss as prefix_core.train: summed target-token CE (fp32) and the token count; the forward under
    bf16 autocast when ``autocast``."""
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((labels != -100).sum())


def train_peft(peft_model, train_enc, cfg: TrainConfig, pad_id: int, log_every: int, autocast: bool) -> dict:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)
    lengths = [len(e) for e in train_enc]
    per_epoch = len(train_enc) // cfg.batch_size
    peft_model.eval()  # no dropout anywhere (as PrefixModel keeps its base in eval mode); grads still flow
    history, last_loss, start, window, window_steps = [], None, time.time(), time.time(), 0
    cached_epoch, batches = None, None
    for step in range(cfg.max_steps):
        epoch, index = divmod(step, per_epoch)
        if epoch != cached_epoch:  # exactly Trainer.global_batch's order
            batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
            cached_epoch = epoch
        batch = [train_enc[i] for i in batches[index]]
        tensors = collate(batch, pad_id)
        loss_sum, _ = token_loss_sum(peft_model, tensors, autocast)
        n_tok = target_token_count(batch)
        (loss_sum / n_tok).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        last_loss = loss_sum.item() / n_tok
        window_steps += 1
        if (step + 1) % log_every == 0 or step + 1 == cfg.max_steps:
            rec = {"step": step + 1, "loss": last_loss, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                   "s_per_step": (time.time() - window) / window_steps}
            history.append(rec)
            log(f"peft {rec}")
            window, window_steps = time.time(), 0
    return {"steps": cfg.max_steps, "seconds": time.time() - start, "final_train_loss": last_loss,
            "history": history}


@torch.no_grad()
def eval_loss(model, enc, pad_id: int, autocast: bool, bs: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, len(enc), bs):
        loss, n = token_loss_sum(model, collate(enc[i : i + bs], pad_id), autocast)
        total, count = total + loss.item(), count + n
    return total / max(count, 1)


# --- decoding -----------------------------------------------------------------------------------
@torch.no_grad()
def greedy_loop(model, input_ids, attention_mask, cache, p: int, max_new_tokens: int, stop_ids: list[int],
                pad_id: int) -> torch.Tensor:
    """Greedy decoding of a bare HF causal LM whose ``cache`` already holds ``p`` prefix positions
    (real tokens at positions p.., like PEFT and prefix_core). Left-padded inputs. Returns new tokens."""
    b = input_ids.shape[0]
    mask = torch.cat([torch.ones(b, p, dtype=attention_mask.dtype), attention_mask], dim=1)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + p
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                logits_to_keep=1)
    next_pos = pos[:, -1:] + 1
    done = torch.zeros(b, dtype=torch.bool)
    stop = torch.tensor(stop_ids)
    tokens = []
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done |= torch.isin(nxt, stop)
        if done.all():
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, cache=out.cache,
                    use_cache=True, logits_to_keep=1)
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1)


def decode_new(tok, new_tokens: torch.Tensor) -> list[str]:
    return tok.batch_decode(new_tokens, skip_special_tokens=True)


def batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def length_order(tok, prompts: list[str]) -> list[int]:
    lens = [len(ids) for ids in tok(prompts)["input_ids"]]
    return sorted(range(len(prompts)), key=lambda i: (lens[i], i))


def run_in_order(prompts: list[str], order: list[int], bs: int, fn) -> list[str]:
    out: list[str | None] = [None] * len(prompts)
    for chunk in batched(order, bs):
        for i, text in zip(chunk, fn([prompts[i] for i in chunk]), strict=True):
            out[i] = text
    return out  # type: ignore[return-value]


def peft_generate(peft_model, tok, prompts: list[str], max_new_tokens: int, stop_ids: list[int]) -> list[str]:
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    p = peft_model.peft_config["default"].num_virtual_tokens
    cache = peft_model.get_prompt(len(prompts))
    new = greedy_loop(peft_model.get_base_model(), enc["input_ids"], enc["attention_mask"], cache, p,
                      max_new_tokens, stop_ids, tok.pad_token_id)
    return decode_new(tok, new)


def cache_from_artifact(art, batch: int, config) -> DynamicCache:
    keys, values = art.keys_values()
    pairs = [(k.float()[None].expand(batch, -1, -1, -1).contiguous(),
              v.float()[None].expand(batch, -1, -1, -1).contiguous()) for k, v in zip(keys, values, strict=True)]
    return DynamicCache(pairs, config=config)


# --- main ---------------------------------------------------------------------------------------
def git_state() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "prefix_core_dirty": bool(git("status", "--porcelain", "prefix_core"))}


def machine_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import peft
    import transformers

    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "sacrebleu": sacrebleu.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps for each trained system")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--limit-test", type=int, default=0, help="score only the first N test MRs (0 = all 630)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gen-batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--val-refs-per-mr", type=int, default=3,
                    help="references per validation MR used for the (diagnostic) validation loss; 0 = all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="training precision of both systems: auto = bf16 autocast only where the CPU has it natively")
    ap.add_argument("--val-frac", type=float, default=0.1)
    ap.add_argument("--check-n", type=int, default=16, help="prompts used for the decoding cross-checks")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e",
                    help="folder with devset.csv and testset_w_refs.csv (default: ../shared/data/e2e beside "
                         "the checkout)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "e2e_quality.json")
    args = ap.parse_args()
    t_all = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_e2e_quality.py " + " ".join(sys.argv[1:])
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    code = git_state()
    log(f"command: {command}; {code}")

    # data
    dev_rows = read_csv(args.data / "devset.csv")
    test_groups = group_refs(read_csv(args.data / "testset_w_refs.csv"))
    train_ex, val_ex, n_train_mr, n_val_mr = split_by_mr(dev_rows, args.val_frac, args.seed)
    test_mrs = list(test_groups)
    if args.limit_test:
        test_mrs = test_mrs[: args.limit_test]
    test_refs = [test_groups[m] for m in test_mrs]
    test_prompts = [TEMPLATE.format(source=m) for m in test_mrs]
    if args.val_refs_per_mr:
        val_ex = first_refs(val_ex, args.val_refs_per_mr)
    log(f"train {len(train_ex)} rows / {n_train_mr} MRs, val {len(val_ex)} rows / {n_val_mr} MRs, "
        f"test {len(test_mrs)} MRs ({sum(map(len, test_refs))} refs, max {max(map(len, test_refs))} per MR)")

    # models: two independent instances (PrefixModel switches the attention implementation of its base)
    base, tok = load_base_model(MODEL)
    peft_base = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32)
    peft_base.requires_grad_(False)
    peft_base.eval()
    assert base.config is not peft_base.config
    base_params = sum(p.numel() for p in base.parameters())
    pad_id = tok.pad_token_id
    stop_ids = stop_token_ids(tok)

    # check the manual greedy loop against HF generate() on the bare model (before anything is attached)
    check_prompts = test_prompts[: args.check_n]
    enc = tok(check_prompts, return_tensors="pt", padding=True, padding_side="left")
    t0 = time.time()
    hf = peft_base.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad_id,
                            eos_token_id=stop_ids)
    hf_texts = decode_new(tok, hf[:, enc["input_ids"].shape[1] :])
    mine = decode_new(tok, greedy_loop(peft_base, enc["input_ids"], enc["attention_mask"],
                                       DynamicCache(config=peft_base.config), 0, args.max_new_tokens,
                                       stop_ids, pad_id))
    loop_check = {"prompts": len(check_prompts), "identical": sum(a == b for a, b in zip(hf_texts, mine, strict=True))}
    log(f"greedy loop vs HF generate on the bare model: {loop_check} ({time.time() - t0:.1f}s)")
    if loop_check["identical"] != loop_check["prompts"]:
        for a, b in zip(hf_texts, mine, strict=True):
            if a != b:
                log(f"  MISMATCH hf={a!r}\n           loop={b!r}")

    prec = decide(args.precision, "cpu")
    log(f"training precision: {prec.reason}" + (f" ({prec.warning})" if prec.warning else ""))
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                      mixed_precision=args.precision, log_every=25, seed=args.seed)
    results: dict = {}

    # 1. ours
    model = PrefixModel(base, PrefixConfig(num_virtual_tokens=10, projection_hidden=512, seed=args.seed))
    ours_params = model.trainable_parameters()
    log(f"ours: {ours_params:,} trainable parameters ({ours_params / base_params:.3%} of {base_params:,})")
    t0 = time.time()
    res = train_prefix(model, tok, train_ex, TEMPLATE, cfg, eval_examples=val_ex,
                       callbacks=[lambda e: log(f"ours {e}")])
    ours_train_wall = time.time() - t0
    art = model.export(prompt_template=TEMPLATE)
    gen = MultiPrefixGenerator(base, tok, {"e2e": art})

    def ours_fn(ps):
        return gen.generate([("e2e", p) for p in ps], max_new_tokens=args.max_new_tokens, do_sample=False,
                            eos_token_id=stop_ids)

    def base_fn(ps):
        return gen.generate([(None, p) for p in ps], max_new_tokens=args.max_new_tokens, do_sample=False,
                            eos_token_id=stop_ids)

    order = length_order(tok, test_prompts)
    t0 = time.time()
    ours_raw = run_in_order(test_prompts, order, args.gen_batch_size, ours_fn)
    ours_gen_s = time.time() - t0
    log(f"ours: generated {len(ours_raw)} in {ours_gen_s:.0f}s")
    # cross-check: our prefix decoded by the manual loop (from a DynamicCache holding the folded prefix)
    ref_texts = ours_fn(check_prompts)
    enc = tok(check_prompts, return_tensors="pt", padding=True, padding_side="left")
    loop_texts = decode_new(tok, greedy_loop(peft_base, enc["input_ids"], enc["attention_mask"],
                                             cache_from_artifact(art, len(check_prompts), peft_base.config),
                                             art.num_virtual_tokens, args.max_new_tokens, stop_ids, pad_id))
    ours_loop_check = {"prompts": len(check_prompts),
                       "identical": sum(a == b for a, b in zip(ref_texts, loop_texts, strict=True))}
    log(f"ours: MultiPrefixGenerator vs manual loop on the folded prefix: {ours_loop_check}")

    # 3. base, no prefix
    t0 = time.time()
    base_raw = run_in_order(test_prompts, order, args.gen_batch_size, base_fn)
    base_gen_s = time.time() - t0
    log(f"base: generated {len(base_raw)} in {base_gen_s:.0f}s")
    bare_vs_fresh = {"prompts": len(check_prompts),
                     "identical": sum(a == b for a, b in zip(base_fn(check_prompts), hf_texts, strict=True))}
    log(f"base: MultiPrefixGenerator(None) vs HF generate on a fresh model: {bare_vs_fresh}")

    # 2. PEFT
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(args.seed)
    peft_model = get_peft_model(peft_base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10,
                                                              prefix_projection=True, encoder_hidden_size=512))
    peft_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log(f"peft: {peft_params:,} trainable parameters ({peft_params / base_params:.3%})")
    train_enc = encode(tok, train_ex, TEMPLATE, cfg.max_length)
    val_enc = encode(tok, val_ex, TEMPLATE, cfg.max_length)
    t0 = time.time()
    peft_res = train_peft(peft_model, train_enc, cfg, pad_id, 25, prec.autocast)
    peft_train_wall = time.time() - t0
    peft_val = eval_loss(peft_model, val_enc, pad_id, prec.autocast)
    log(f"peft: trained {peft_res['steps']} steps in {peft_train_wall:.0f}s, val loss {peft_val:.4f}")
    t0 = time.time()
    peft_raw = run_in_order(test_prompts, order, args.gen_batch_size,
                            lambda ps: peft_generate(peft_model, tok, ps, args.max_new_tokens, stop_ids))
    peft_gen_s = time.time() - t0
    log(f"peft: generated {len(peft_raw)} in {peft_gen_s:.0f}s")

    # scores
    systems = {
        "ours": {"raw": ours_raw, "trainable_params": ours_params, "train_seconds": ours_train_wall,
                 "train_seconds_loop": res.seconds, "steps": res.steps, "final_train_loss": res.final_train_loss,
                 "val_loss": res.best_eval_loss, "gen_seconds": ours_gen_s,
                 "decoding": "MultiPrefixGenerator.generate (HF generate, greedy, fp32)",
                 "history": res.history},
        "peft": {"raw": peft_raw, "trainable_params": peft_params, "train_seconds": peft_train_wall,
                 "steps": peft_res["steps"], "final_train_loss": peft_res["final_train_loss"], "val_loss": peft_val,
                 "gen_seconds": peft_gen_s, "decoding": "manual greedy loop from get_prompt() cache, fp32",
                 "history": peft_res["history"]},
        "base": {"raw": base_raw, "trainable_params": 0, "train_seconds": 0.0, "steps": 0, "gen_seconds": base_gen_s,
                 "decoding": "MultiPrefixGenerator.generate with the None prefix (HF generate, greedy, fp32)"},
    }
    signature = None
    for name, s in systems.items():
        hyps = [clean(t) for t in s.pop("raw")]
        score, signature = bleu(hyps, test_refs)
        s["bleu"] = round(score.score, 2)
        s["bleu_detail"] = str(score)
        s["empty_outputs"] = sum(not h for h in hyps)
        if s["trainable_params"]:
            s["trainable_share_of_base"] = s["trainable_params"] / base_params
        if s["steps"]:
            s["steps_per_s"] = s["steps"] / s["train_seconds"]
        s["samples"] = [{"mr": test_mrs[i], "output": hyps[i], "ref0": test_refs[i][0]}
                        for i in range(min(5, len(hyps)))]
        s["outputs"] = hyps
        results[name] = s
        log(f"{name}: BLEU {s['bleu']:.2f}  ({s['bleu_detail']})")

    gap = results["ours"]["bleu"] - results["peft"]["bleu"]
    report = {
        "benchmark": "e2e_quality",
        "command": command,
        "date": date,
        "machine": machine_info(),
        "code": code,
        "model": MODEL,
        "template": TEMPLATE,
        "data": {"dir": str(args.data), "train_rows": len(train_ex), "train_mrs": n_train_mr,
                 "val_rows": len(val_ex), "val_mrs": n_val_mr, "split_seed": args.seed,
                 "test_mrs": len(test_mrs), "test_refs": sum(map(len, test_refs)),
                 "limit_test": args.limit_test},
        "budget": {"steps_each": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                   "examples_seen": args.steps * args.batch_size,
                   "epochs": args.steps * args.batch_size / len(train_ex), "max_new_tokens": args.max_new_tokens,
                   "gen_batch_size": args.gen_batch_size, "torch_threads": torch.get_num_threads(),
                   "stop": f"EOS or any of {len(stop_ids)} tokens containing a newline",
                   "val_refs_per_mr": args.val_refs_per_mr,
                   "train_precision": f"{prec.reason}; bf16 means autocast around forward and loss, fp32 weights "
                                      "and optimizer (ours through TrainConfig.mixed_precision, PEFT in this script)",
                   "decode_precision": "fp32, no autocast"},
        "train_config": cfg.to_dict(),
        "base_params": base_params,
        "bleu_signature": signature,
        "checks": {"greedy_loop_vs_hf_generate_bare": loop_check, "ours_generator_vs_manual_loop": ours_loop_check,
                   "generator_no_prefix_vs_fresh_model": bare_vs_fresh},
        "systems": results,
        "targets": {"ours_minus_peft_bleu": round(gap, 2), "ours_within_0.5_of_peft_or_better": gap >= -0.5,
                    "ours_minus_base_bleu": round(results["ours"]["bleu"] - results["base"]["bleu"], 2)},
        "total_seconds": time.time() - t_all,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}; total {report['total_seconds'] / 60:.1f} min")
    for name in ("ours", "peft", "base"):
        s = results[name]
        log(f"  {name:5s} BLEU {s['bleu']:6.2f}  params {s['trainable_params']:>10,}  "
            f"train {s['train_seconds']:6.0f}s / {s['steps']} steps  gen {s['gen_seconds']:5.0f}s")


if __name__ == "__main__":
    main()
