"""Multi-prefix serving benchmark: 16 prefixes x 16 prompts, 32 new tokens each, greedy.

Exact command of the reported CPU run (2-core shared CPU, one torch thread: see bench_train_step.py):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_multi_prefix.py --threads 1 --reps 5 --warmup 1

GPU run (H100): ``--model`` takes any local model folder; the GPU machine has no copy of the
embedded weights, so the reported GPU run used a SmolLM2-135M-shaped model with random fp32
weights (its config + tokenizer, ``AutoModelForCausalLM.from_config(...).save_pretrained(DIR)``):

    HF_HUB_OFFLINE=1 python benchmarks/bench_multi_prefix.py --model DIR --device cuda --reps 5 --warmup 1

(a) ours, mixed: one batch of 16 rows, each row its own prefix (MultiPrefixGenerator).
(b) PEFT, one prefix at a time: 16 greedy runs of batch 1, each from PEFT's prompt cache
    ``peft_model.get_prompt(1)`` through a manual greedy loop (PeftModel.generate() ignores the
    prefix with transformers 5.24). The loop is first checked against HF generate() on the bare model.
(c) ours, same prefix: the 16 prompts, all with one prefix (the longest, P = 20), through the same
    MultiPrefixGenerator (same bank). (c1) the same through a generator that holds only that prefix.

The 16 prefixes are random-initialized PrefixModels (seed i, P = 5 + i), exported to artifacts;
PEFT loads them through ``art.to_peft(dir)`` + ``PeftModel.from_pretrained`` / ``load_adapter``.
Every run makes exactly 32 new tokens per row (EOS does not stop generation: ``eos_token_id=None``
in HF generate, plain argmax in the manual loop), so tokens/s = 16 * 32 / wall time. Timing
includes tokenization and decoding for all variants. Variants are timed round-robin, repetition
by repetition in a rotating order (background load hits all alike); figures are medians.

Correctness: each row of (a) must equal its prefix run alone through
``PrefixModel.from_artifact(base, art).generate(...)``; rows of (a) are also compared with (b).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers greater than ten.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "What is the difference between weather and climate, and why does it matter for farmers?",
    "Give me a name for a pet turtle.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "What does a compiler do?",
    "Suggest a healthy breakfast that takes less than five minutes to prepare on a busy weekday.",
    "Who wrote the theory of general relativity?",
    "Describe a cat to someone who has never seen one.",
    "What is 17 times 3?",
    "Name a famous painting by Vincent van Gogh and describe it briefly.",
]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def greedy_loop(lm, tok, input_ids: torch.Tensor, cache, max_new_tokens: int) -> torch.Tensor:
    """Plain greedy decoding (batch 1, no padding) continuing from ``cache`` (prefix or empty).
    Positions follow the cache length (transformers derives them from it): P.. after a prefix."""
    past = cache.get_seq_length()
    attn = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    out = lm(input_ids=input_ids, attention_mask=attn, cache=cache, use_cache=True, logits_to_keep=1)
    new = []
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1, :].float().argmax(-1, keepdim=True)
        new.append(nxt)
        if step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(nxt)], dim=-1)
        out = lm(input_ids=nxt, attention_mask=attn, cache=cache, use_cache=True, logits_to_keep=1)
    return torch.cat(new, dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--prefixes", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="repetitions (interleaved round-robin)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=str(RESULTS / "multi_prefix.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")

    import peft
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, DynamicCache

    from prefix_core import MultiPrefixGenerator, PrefixConfig, PrefixModel, load_base_model
    from prefix_core.base_model import resolve_model_path

    dtype, device, n, new_tokens = DTYPES[args.dtype], args.device, args.prefixes, args.max_new_tokens
    gen_kw = {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": None}

    base, tok = load_base_model(args.model, dtype=dtype, device=device)
    peft_base = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=dtype,
                                                     attn_implementation="sdpa").to(device)
    peft_base.requires_grad_(False)
    peft_base.eval()

    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]]
    prompt_lens = [len(tok(p)["input_ids"]) for p in prompts]

    # --- 16 random prefixes, P = 5..20 ------------------------------------------------------------
    lengths = [5 + (15 * i) // max(n - 1, 1) for i in range(n)]
    arts = {}
    for i, p in enumerate(lengths):
        pm = PrefixModel(base, PrefixConfig(num_virtual_tokens=p, projection_hidden=512, seed=i))
        arts[f"p{i}"] = pm.export()
    names = list(arts)
    longest = names[max(range(n), key=lambda i: lengths[i])]
    mixed = MultiPrefixGenerator(base, tok, arts)
    single = MultiPrefixGenerator(base, tok, {longest: arts[longest]})

    # --- PEFT: same tables as adapters -------------------------------------------------------------
    tmp = Path(tempfile.mkdtemp(prefix="bench_multi_prefix_"))
    for name in names:
        arts[name].to_peft(tmp / name)
    peft_model = PeftModel.from_pretrained(peft_base, str(tmp / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(tmp / name), adapter_name=name)
    peft_model.eval()
    lm = peft_model.get_base_model()

    # --- check the manual loop against HF generate() on the bare model ----------------------------
    loop_ok = 0
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
        ref = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_token_id,
                          **gen_kw)[:, ids.shape[1]:]
        mine = greedy_loop(lm, tok, ids, DynamicCache(config=lm.config), new_tokens)
        loop_ok += int(torch.equal(ref, mine))
    print(f"manual greedy loop == HF generate() on the bare model: {loop_ok}/{n}", flush=True)

    # --- the variants ------------------------------------------------------------------------------
    def run_mixed() -> list[str]:
        return mixed.generate(list(zip(names, prompts, strict=True)), **gen_kw)

    def run_same() -> list[str]:
        return mixed.generate([(longest, p) for p in prompts], **gen_kw)

    def run_single() -> list[str]:
        return single.generate([(longest, p) for p in prompts], **gen_kw)

    def run_peft() -> list[str]:
        texts = []
        for name, prompt in zip(names, prompts, strict=True):
            peft_model.set_adapter(name)
            ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
            cache = peft_model.get_prompt(batch_size=1)
            texts.append(tok.decode(greedy_loop(lm, tok, ids, cache, new_tokens)[0], skip_special_tokens=True))
        return texts

    variants = {"a_ours_mixed": run_mixed, "b_peft_one_at_a_time": run_peft, "c_ours_same_prefix": run_same,
                "c1_ours_single_prefix_generator": run_single}
    outputs = {}
    for name, fn in variants.items():
        for _ in range(args.warmup):
            outputs[name] = fn()
    order = list(variants)
    times: dict[str, list[float]] = {k: [] for k in order}
    total_tokens = n * new_tokens
    for rep in range(args.reps):
        for name in order[rep % len(order):] + order[: rep % len(order)]:
            sync(device)
            t0 = time.perf_counter()
            outputs[name] = variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        print(f"  rep {rep + 1}/{args.reps}: " + "  ".join(
            f"{k} {total_tokens / times[k][-1]:.0f} tok/s" for k in order), flush=True)

    # Exactly new_tokens per row (not timed): the mixed batch's token ids through the same inputs.
    with torch.no_grad():
        inputs = mixed._inputs(list(zip(names, prompts, strict=True)), apply_template=False)
        ids_out = base.generate(**inputs, pad_token_id=tok.pad_token_id, **gen_kw)
        new_per_row = ids_out.shape[1] - inputs["input_ids"].shape[1]

    # --- correctness: each row of (a) vs its prefix alone through PrefixModel.from_artifact -------
    alone = []
    for name, prompt in zip(names, prompts, strict=True):
        enc = tok(prompt, return_tensors="pt").to(device)
        pm = PrefixModel.from_artifact(base, arts[name])
        out = pm.generate(**enc, pad_token_id=tok.pad_token_id, **gen_kw)
        alone.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    same_alone = []
    pm = PrefixModel.from_artifact(base, arts[longest])
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt").to(device)
        out = pm.generate(**enc, pad_token_id=tok.pad_token_id, **gen_kw)
        same_alone.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    a = outputs["a_ours_mixed"]
    match = {
        "a_vs_prefixmodel_alone": sum(x == y for x, y in zip(a, alone, strict=True)),
        "a_vs_peft_manual_loop": sum(x == y for x, y in zip(a, outputs["b_peft_one_at_a_time"], strict=True)),
        "prefixmodel_alone_vs_peft": sum(x == y for x, y in zip(alone, outputs["b_peft_one_at_a_time"],
                                                               strict=True)),
        "c_vs_prefixmodel_alone": sum(x == y for x, y in zip(outputs["c_ours_same_prefix"], same_alone, strict=True)),
        "c_vs_c1": sum(x == y for x, y in zip(outputs["c_ours_same_prefix"],
                                              outputs["c1_ours_single_prefix_generator"], strict=True)),
        "of": n,
        "distinct_outputs_in_a": len(set(a)),
    }

    tp = {k: statistics.median(total_tokens / t for t in v) for k, v in times.items()}
    ratios = {
        "a_over_b": tp["a_ours_mixed"] / tp["b_peft_one_at_a_time"],
        "a_over_c": tp["a_ours_mixed"] / tp["c_ours_same_prefix"],
        "a_over_c1": tp["a_ours_mixed"] / tp["c1_ours_single_prefix_generator"],
    }
    results = {
        "benchmark": "multi_prefix",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu x{os.cpu_count()}",
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "setup": {"prefixes": n, "prefix_lengths": lengths, "prompt_tokens": prompt_lens,
                  "max_new_tokens": new_tokens, "new_tokens_per_row_checked": new_per_row,
                  "tokens_per_run": total_tokens, "reps": args.reps, "warmup": args.warmup,
                  "same_prefix": f"{longest} (P={lengths[names.index(longest)]})",
                  "timing": "round-robin per repetition (rotating order), median tokens/s; includes tokenize+decode"},
        "manual_loop_equals_hf_generate_bare": f"{loop_ok}/{n}",
        "tokens_per_s": tp,
        "tokens_per_s_reps": {k: [total_tokens / t for t in v] for k, v in times.items()},
        "ratios": ratios,
        "targets": {"a_over_b_ge_4": ratios["a_over_b"] >= 4.0,
                    "a_at_most_5pct_slower_than_c": ratios["a_over_c"] >= 0.95},
        "correctness": match,
        "sample_outputs": {"a": a[:3], "peft": outputs["b_peft_one_at_a_time"][:3], "alone": alone[:3]},
    }

    print(f"\n{'variant':34} {'tok/s (median)':>15}")
    for k, v in tp.items():
        print(f"{k:34} {v:15.1f}")
    print("ratios: " + "  ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    print(f"targets: {results['targets']}")
    print(f"correctness: {match}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
