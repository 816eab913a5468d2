"""Helpers for pipeline tests: a tiny random llama saved as a local model folder, a generated task
the tiny model can learn quickly, and spec dicts."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import char_tokenizer, make_base

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def save_tiny_model(path: Path) -> Path:
    """A tiny random llama + char tokenizer as a local model folder (what users pass as base_model)."""
    if not (path / "config.json").exists():
        base = make_base("llama", seed=0)
        base.save_pretrained(path)
        char_tokenizer().save_pretrained(path)
    return path


def write_task(path: Path, n: int = 120, seed: int = 0) -> Path:
    """A copy task (``source`` -> the same words reversed) as JSON lines, lowercase for the char tokenizer."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(3)]
            fh.write(json.dumps({"source": " ".join(words), "target": " ".join(reversed(words))}) + "\n")
    return path


def spec_dict(model_dir: Path, source: Path, client: str = "acme", task: str = "rev", **overrides) -> dict:
    spec = {
        "client": client, "task": task, "base_model": str(model_dir),
        "data": {"source": str(source), "template": "in: {source}\nout:", "validation_fraction": 0.1,
                 "test_fraction": 0.1, "max_length": 64},
        "prefix": {"num_virtual_tokens": 4, "projection_hidden": 32},
        "train": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "eval_every": 3, "checkpoint_every": 3,
                  "mixed_precision": "no"},
        "evaluate": {"metrics": ["bleu", "exact_match"], "max_new_tokens": 12, "batch_size": 16, "max_examples": 6,
                     "gate": {"metric": "bleu", "min_gain_over_baseline": -100.0,
                              "min_gain_over_champion": -100.0}},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            spec[section] = {**spec[section], field: value}
        else:
            spec[section] = value
    return spec
