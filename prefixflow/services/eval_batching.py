"""Generations of the evaluations that run at once in one process, decoded together.

A fleet's pipelines are threads of one process, and their evaluations share the base (``evaluation.shared_base``).
Each evaluation hands its generation requests (candidate, baseline and champion rows) to :data:`POOL`; requests of
evaluations that are running at the same time, on the same base and with the same decoding settings, are decoded
in mixed-prefix batches of all their clients together (``MultiPrefixGenerator``: each row attends to its own
prefix only and computes what it would alone, so each client's outputs, and its metrics, are those of evaluating
it alone). The first evaluation to arrive waits for the others that are running (at most ``gather_s``), decodes
for all of them, and hands each its own texts; a batch that fails is decoded again evaluation by evaluation, so an
error stays with the evaluation that caused it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Deferred imports: prefix_core (torch) is deferred to the decoding: the CLI imports the evaluation service.

GATHER_S = 1.0  # how long the first evaluation waits for the others that are running


@dataclass
class _Job:
    prefixes: dict  # name -> PrefixArtifact
    requests: list[tuple[str | None, str]]  # (prefix name or None, rendered prompt)
    batch_size: int
    done: threading.Event = field(default_factory=threading.Event)
    texts: list[str] | None = None
    error: BaseException | None = None


class GenerationPool:
    """Decodes the requests of concurrent evaluations together (see the module docstring). ``batches``: how many
    decoding batches held rows of more than one evaluation (for tests and logs)."""

    def __init__(self, gather_s: float = GATHER_S) -> None:
        self.gather_s = gather_s
        self._cond = threading.Condition()
        self._running = 0  # evaluations inside ``evaluating()``
        self._waiting: dict[tuple, list[_Job]] = {}
        self.batches = 0

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Around one evaluation: the pool waits for the evaluations inside such blocks."""
        with self._cond:
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def generate(self, base, tokenizer, prefixes: dict, requests: list[tuple[str | None, str]], batch_size: int,
                 max_new_tokens: int, decoding: dict) -> list[str]:
        """The new text of each request (prompts already rendered), decoded with ``decoding`` (HF generate
        kwargs) together with the requests of the other evaluations running now."""
        key = (id(base), max_new_tokens, json.dumps(decoding, sort_keys=True, default=str))
        job = _Job(dict(prefixes), list(requests), batch_size)
        with self._cond:
            leader = key not in self._waiting
            jobs = self._waiting.setdefault(key, [])
            jobs.append(job)
            self._cond.notify_all()
            if leader:  # wait for every running evaluation to hand in its requests, up to gather_s
                deadline = time.monotonic() + self.gather_s
                while len(jobs) < self._running and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                del self._waiting[key]
        if leader:
            self._decode(base, tokenizer, jobs, max_new_tokens, decoding)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.texts or []

    def _decode(self, base, tokenizer, jobs: list[_Job], max_new_tokens: int, decoding: dict) -> None:
        try:
            if len(jobs) > 1:
                try:
                    self._decode_together(base, tokenizer, jobs, max_new_tokens, decoding)
                    return
                except Exception:  # decode again one by one: the error stays with its evaluation
                    pass
            for job in jobs:
                try:
                    self._decode_together(base, tokenizer, [job], max_new_tokens, decoding)
                except Exception as err:
                    job.error = err
        finally:
            for job in jobs:
                job.done.set()

    def _decode_together(self, base, tokenizer, jobs: list[_Job], max_new_tokens: int, decoding: dict) -> None:
        from prefix_core import MultiPrefixGenerator

        prefixes = {f"{i}/{name}": art for i, job in enumerate(jobs) for name, art in job.prefixes.items()}
        rows = [(None if name is None else f"{i}/{name}", prompt) for i, job in enumerate(jobs)
                for name, prompt in job.requests]
        gen = MultiPrefixGenerator(base, tokenizer, prefixes)
        size = max(1, min(job.batch_size for job in jobs))
        texts: list[str] = []
        for start in range(0, len(rows), size):
            texts += gen.generate(rows[start:start + size], max_new_tokens=max_new_tokens, do_sample=False,
                                  **decoding)
            if len({name.split("/")[0] for name, _ in rows[start:start + size] if name}) > 1:
                self.batches += 1
        for job in jobs:
            job.texts, texts = texts[:len(job.requests)], texts[len(job.requests):]


POOL = GenerationPool()
