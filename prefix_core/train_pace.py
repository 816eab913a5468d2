"""The pace of a training run: tokens/s and the ETA reported in its step events; the clock its cost is read from."""

from __future__ import annotations

import time


def clock() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds over all its threads): what a training's cost is measured with."""
    return time.perf_counter(), time.process_time()


class Pace:
    """Tokens/s and the ETA of a run. Validation and checkpoint time is kept out of tokens/s and of the per-step
    part of the ETA (each eval event reports its own time; the ETA adds the validations still to come at their
    mean time)."""

    def __init__(self) -> None:
        self.started = self.window_start = time.time()
        self.tokens = self.window_tokens = 0
        self.paused = self.window_paused = 0.0
        self.eval_times: list[float] = []

    def count(self, tokens: int) -> None:
        self.tokens += tokens
        self.window_tokens += tokens

    def paused_for(self, seconds: float) -> None:
        self.paused += seconds
        self.window_paused += seconds

    def window(self, steps_done: int, steps_left: int, evals_left: int) -> tuple[float, float]:
        """(tokens/s since the last window, ETA in seconds); starts a new window."""
        now = time.time()
        tokens_per_s = self.window_tokens / max(now - self.window_start - self.window_paused, 1e-9)
        eta = (now - self.started - self.paused) / max(steps_done, 1) * steps_left
        eta += evals_left * (sum(self.eval_times) / len(self.eval_times) if self.eval_times else 0.0)
        self.window_tokens, self.window_start, self.window_paused = 0, now, 0.0
        return tokens_per_s, eta
