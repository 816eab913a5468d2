"""Source->target examples for prefix training: templating, tokenization, batching.

Decoder-only models see ``prompt + target + EOS`` with the loss on ``target + EOS`` only;
encoder-decoder models see the prompt as encoder input and ``target + EOS`` as labels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .template import check_template, render

IGNORE = -100


@dataclass(frozen=True)
class Example:
    source: str
    target: str


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example. ``prompt`` is what the model conditions on, ``target`` what it
    learns to produce (ends with EOS)."""

    prompt: tuple[int, ...]
    target: tuple[int, ...]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.prompt) + len(self.target)


def encode(tokenizer, examples: list[Example], template: str, max_length: int, target_prefix: str = " ",
           encoder_decoder: bool = False) -> list[Encoded]:
    """Tokenize examples. Over-long examples keep the end of the prompt and the start of the target
    (``truncated=True``); the target keeps at least one token."""
    check_template(template)
    prompts = tokenizer([render(template, e.source) for e in examples], add_special_tokens=True)["input_ids"]
    targets = tokenizer([target_prefix + e.target for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for prompt, target in zip(prompts, targets, strict=True):
        target = list(target) + ([eos] if eos is not None else [])
        truncated = False
        limit = max_length if not encoder_decoder else None
        if limit is not None and len(prompt) + len(target) > limit:
            truncated = True
            target = target[: max(1, limit - min(len(prompt), limit // 2))]
            prompt = prompt[len(prompt) - (limit - len(target)) :]
        elif encoder_decoder and (len(prompt) > max_length or len(target) > max_length):
            truncated = True
            prompt, target = prompt[-max_length:], target[:max_length]
        out.append(Encoded(tuple(prompt), tuple(target), truncated))
    return out


def collate(batch: list[Encoded], pad_id: int, encoder_decoder: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded tensors: ``input_ids``, ``attention_mask``, ``labels`` (IGNORE outside targets)."""
    if encoder_decoder:
        src = [list(e.prompt) for e in batch]
        tgt = [list(e.target) for e in batch]
        return {
            "input_ids": _pad(src, pad_id),
            "attention_mask": _pad([[1] * len(s) for s in src], 0),
            "labels": _pad(tgt, IGNORE),
        }
    ids = [list(e.prompt) + list(e.target) for e in batch]
    labels = [[IGNORE] * len(e.prompt) + list(e.target) for e in batch]
    return {
        "input_ids": _pad(ids, pad_id),
        "attention_mask": _pad([[1] * len(x) for x in ids], 0),
        "labels": _pad(labels, IGNORE),
    }


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           group: bool = True, mega: int = 32) -> list[list[int]]:
    """One epoch of batches (index lists), deterministic in (seed, epoch). Indices are shuffled,
    cut into mega-batches of ``mega * batch_size``, sorted by length inside each (less padding),
    cut into batches, and the batches shuffled. The last incomplete batch is dropped."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group:
        chunk = mega * batch_size
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s : s + chunk], key=lambda j: -lengths[j])]
    batches = [order[s : s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def target_token_count(batch: list[Encoded]) -> int:
    return sum(len(e.target) for e in batch)


def init_text_from_targets(examples: list[Example], num_tokens: int, chars_per_token: int = 8,
                           max_examples: int = 32) -> str:
    """Text for ``PrefixConfig(init="text")`` taken from the task itself: the first training targets, joined
    with spaces until the text surely has ``num_tokens`` tokens (``chars_per_token`` characters each, a generous
    bound) or ``max_examples`` targets are used. Deterministic for a given training set."""
    parts: list[str] = []
    for ex in examples[:max_examples]:
        parts.append(ex.target.strip())
        if sum(len(p) + 1 for p in parts) >= num_tokens * chars_per_token:
            break
    return " ".join(p for p in parts if p)
