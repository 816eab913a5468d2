"""Helpers for pipeline tests: a tiny random llama saved as a local model folder, a generated task
the tiny model can learn quickly, and spec dicts."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefixflow import processes
from support.tiny_models import char_tokenizer, make_base

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


@contextmanager
def patched_environ(values: dict[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    """os.environ with ``values`` set and ``unset`` removed, restored afterwards (for module-scoped fixtures,
    where pytest's monkeypatch is not available)."""
    saved = {k: os.environ.get(k) for k in (*values, *unset)}
    os.environ.update(values)
    for k in unset:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def survivors(job_file: Path) -> list[int]:
    """Processes still running this job (there must be none after run_launch returns)."""
    return processes.survivors(str(job_file))


MARK_ENV = "PREFIXFLOW_TEST_MARK"


def marked(mark: str) -> list[int]:
    """Live processes that inherited ``PREFIXFLOW_TEST_MARK=mark`` in their environment, whatever their process
    group or session (a CLI run, its launcher and ranks, its ephemeral Prefect API)."""
    needle = f"{MARK_ENV}={mark}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ and processes.alive(int(entry)):
            out.append(int(entry))
    return out
