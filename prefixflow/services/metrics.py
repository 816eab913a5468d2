"""Generation metrics, all on a 0-100 scale so gates compare like with like.

``refs[i]`` holds every reference of example ``i`` (multi-reference scoring, as for E2E).
BLEU and chrF are sacrebleu's corpus scores; ROUGE-L is rouge-score's best-reference F1, averaged;
exact_match compares whitespace-normalized text; accuracy is exact match ignoring case and final
punctuation (for label tasks).
"""

from __future__ import annotations

import re
import string

# Deferred imports: sacrebleu and rouge-score are deferred to the metric that needs each.

METRICS = ("bleu", "chrf", "rougeL", "exact_match", "accuracy")


def reference_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's reference streams from per-example reference lists of different lengths."""
    width = max(len(r) for r in refs)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(width)]  # sacrebleu skips None


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _label(text: str) -> str:
    return _norm(text).lower().rstrip(string.punctuation + " ")


def score(metric: str, hyps: list[str], refs: list[list[str]]) -> float:
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"need one or more hypotheses with references, got {len(hyps)} and {len(refs)}")
    if metric == "bleu":
        import sacrebleu

        return float(sacrebleu.BLEU().corpus_score(hyps, reference_streams(refs)).score)
    if metric == "chrf":
        import sacrebleu

        return float(sacrebleu.CHRF().corpus_score(hyps, reference_streams(refs)).score)
    if metric == "rougeL":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return 100 * sum(scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs, strict=True)) \
            / len(hyps)
    if metric == "exact_match":
        return 100 * sum(_norm(h) in {_norm(x) for x in r} for h, r in zip(hyps, refs, strict=True)) / len(hyps)
    if metric == "accuracy":
        return 100 * sum(_label(h) in {_label(x) for x in r} for h, r in zip(hyps, refs, strict=True)) / len(hyps)
    raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def score_all(metrics: list[str], hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    return {m: round(score(m, hyps, refs), 4) for m in metrics}
