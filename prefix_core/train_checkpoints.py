"""Checkpoints of a training run: save the current step (collective), find and restore the newest complete one
that every rank can load. A checkpoint holds the trainable prefix state (embedding and MLP, gathered under
ZeRO-3), the optimizer (or, under DeepSpeed, each rank's ZeRO shard), the scheduler, each rank's RNG state, the
best prefix so far and the loop's counters, so a resumed run continues exactly (see :mod:`prefix_core.checkpoint`
for the folder layout and the commit protocol)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as ckpt

DS_TAG = "state"  # the DeepSpeed checkpoint tag inside a checkpoint's ``deepspeed/`` folder


class CheckpointedTraining:
    """The checkpoint half of :class:`prefix_core.train.Trainer`, which provides what these methods use: ``acc``
    (the Accelerator), ``world``, ``deepspeed``, ``zero_stage``, ``wrapped`` (the DeepSpeed engine), ``model``,
    ``torch_optimizer``, ``scheduler``, ``config``, ``checkpoint_dir``, the loop's counters (``step``,
    ``history``, ``best_eval``, ``bad_evals``, ``best_state``, ``resumed_from``), ``prefix_state()`` and
    ``emit()``."""

    def _strategy(self) -> dict:
        return {"deepspeed": self.deepspeed, "zero_stage": self.zero_stage, "world": self.world}

    # --- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (collective: every rank calls it). Each rank writes
        its RNG state (and, under DeepSpeed, its ZeRO shard); the main process writes the rest and
        commits: COMPLETE marker last, then one rename, then pruning to ``keep_checkpoints``."""
        if self.checkpoint_dir is None:
            return None
        self.acc.wait_for_everyone()
        tmp = self.checkpoint_dir / f".step-{self.step:08d}.tmp"
        if self.acc.is_main_process:
            ckpt.begin(self.checkpoint_dir, self.step)
        self.acc.wait_for_everyone()
        ckpt.save_tree(ckpt.rng_state(), tmp, f"rng-rank{self.acc.process_index}")
        if self.deepspeed:
            self.wrapped.save_checkpoint(str(tmp / ckpt.DEEPSPEED_DIR), tag=DS_TAG, client_state={},
                                         save_latest=False, exclude_frozen_parameters=True)
        trainable = self.prefix_state()
        self.acc.wait_for_everyone()
        final = None
        if self.acc.is_main_process:
            ckpt.save_tree(trainable, tmp, "trainable")
            if not self.deepspeed:  # under DeepSpeed the optimizer state is in the ZeRO shards
                ckpt.save_tree(self.torch_optimizer.state_dict(), tmp, "optimizer")
            ckpt.save_tree(self.best_state or {}, tmp, "best")
            (tmp / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
            state = {"step": self.step, "world": self.world, "history": self.history, "best_eval": self.best_eval,
                     "bad_evals": self.bad_evals, "config": self.config.to_dict(), "strategy": self._strategy()}
            (tmp / "state.json").write_text(json.dumps(state))
            final = ckpt.commit(self.checkpoint_dir, tmp, self.step, self.config.keep_checkpoints)
        self.acc.wait_for_everyone()
        final = final or ckpt.step_dir(self.checkpoint_dir, self.step)
        self.emit({"event": "checkpoint", "step": self.step, "path": str(final)})
        return final

    def _check_compatible(self, path: Path, state: dict) -> None:
        saved = state.get("strategy") or {"deepspeed": False, "zero_stage": 0, "world": state.get("world")}
        if bool(saved.get("deepspeed")) != self.deepspeed or (
            self.deepspeed and (saved.get("zero_stage") != self.zero_stage or saved.get("world") != self.world)
        ):
            def describe(s: dict) -> str:
                kind = f"DeepSpeed ZeRO-{s.get('zero_stage')}" if s.get("deepspeed") else "DDP/single"
                return f"{kind} with {s.get('world')} process(es)"

            raise ckpt.IncompatibleCheckpointError(
                f"checkpoint {path} was written by {describe(saved)} but this run is {describe(self._strategy())}; "
                "resume with the same strategy and process count (DeepSpeed) or use a new checkpoint_dir"
            )

    def _load(self, path: Path) -> dict:
        """Read this rank's part of a checkpoint (raises if any of it is missing or unreadable)."""
        state = json.loads((path / "state.json").read_text())
        self._check_compatible(path, state)
        rank_file = f"rng-rank{self.acc.process_index}"
        data = {
            "state": state,
            "trainable": ckpt.load_tree(path, "trainable"),
            "best": ckpt.load_tree(path, "best"),
            "scheduler": json.loads((path / "scheduler.json").read_text()),
            "rng": ckpt.load_tree(path, rank_file) if (path / f"{rank_file}.json").exists() else None,
        }
        if self.deepspeed:
            ckpt.check_deepspeed_shards(path / ckpt.DEEPSPEED_DIR / DS_TAG, self.acc.process_index)
        else:
            data["optimizer"] = ckpt.load_tree(path, "optimizer")
        return data

    def _all_ranks(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (so all ranks resume from the same checkpoint)."""
        if self.world == 1:
            return ok
        flags = self.acc.gather(torch.tensor([int(ok)], device=self.acc.device))
        return bool(flags.min().item())

    def resume(self) -> int | None:
        """Restore the newest complete checkpoint that every rank can load; returns its step (None if
        none). Incomplete ones are ignored; unreadable ones are skipped with a warning."""
        if self.checkpoint_dir is None:
            return None
        found = ckpt.newest_loadable(self.checkpoint_dir, self._load, agree=self._all_ranks)
        if found is None:
            return None
        path, data = found
        if self.deepspeed:
            loaded, _ = self.wrapped.load_checkpoint(
                str(path / ckpt.DEEPSPEED_DIR), tag=DS_TAG, load_module_strict=False, load_optimizer_states=True,
                load_lr_scheduler_states=False)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / ckpt.DEEPSPEED_DIR}")
        else:
            self.model.prefix.load_state_dict(data["trainable"])
            ckpt.load_optimizer_state(self.torch_optimizer, data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        for group, lr in zip(self.torch_optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        if data["rng"] is not None:
            ckpt.set_rng_state(data["rng"])
        st = data["state"]
        self.step, self.history, self.best_eval, self.bad_evals = (
            st["step"], st["history"], st["best_eval"], st["bad_evals"])
        self.best_state = data["best"] or None
        self.resumed_from = self.step
        self.emit({"event": "resume", "step": self.step, "path": str(path)})
        return self.step
