"""The prefix training loop (a copyable recipe over library parts, built on accelerate).

One optimizer step consumes ``batch_size`` examples in total, split over processes and
``grad_accum`` micro-batches; the loss is the sum of target-token cross-entropies over the whole
step divided by the step's target-token count, so the result does not depend on how the step is
split (1 process or N, any accumulation). Data order is a pure function of (seed, step), which is
what makes resuming from a checkpoint exact.

The same loop runs in one process, under DDP and under DeepSpeed ZeRO-2/3 (one process per rank,
started by ``accelerate launch``; see ``prefixflow/launch/command.py``). Under DeepSpeed the engine does the
gradient reduction, clipping and the optimizer step; under ZeRO-3 the prefix parameters are
partitioned too, so every read of them (checkpoints, best state, export) gathers them first, and
at the end the trained prefix is consolidated into an ordinary, unpartitioned ``model.prefix``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from transformers import get_linear_schedule_with_warmup

from .base_model import weight_fingerprint
from .config import TrainConfig
from .data import Encoded, Example, collate, encode, length_grouped_batches, target_token_count
from .encoder import PrefixEncoder
from .errors import TrainingDiverged
from .model import PrefixModel
from .precision import Precision, decide
from .train_checkpoints import CheckpointedTraining
from .train_pace import Pace

# Deferred imports: deepspeed is deferred: only DeepSpeed strategies load it.

Callback = Callable[[dict], None]
log = logging.getLogger(__name__)


def make_accelerator() -> Accelerator:
    """The Accelerator for the current (launched) process. DeepSpeed on a machine without CUDA
    needs the gloo backend named explicitly (it would otherwise ask for ccl/nccl)."""
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(kwargs_handlers=handlers)


@dataclass
class TrainResult:
    """Outcome of a run. ``seconds`` is the wall time of ``run()`` (this process's part), including the
    final evaluation and checkpoint; ``history`` holds the logged step and eval records."""

    steps: int
    stopped_early: bool
    best_eval_loss: float | None
    final_train_loss: float | None
    resumed_from: int | None
    train_tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    precision: dict = field(default_factory=dict)  # Precision.to_dict(): requested, mode, reason, ...


def validation_subset(examples: Sequence, limit: int) -> list:
    """At most ``limit`` examples (0: all), evenly spaced over ``examples``: a fixed subset, the same for every
    validation of a run and for every run on the same data."""
    examples = list(examples)
    if not limit or len(examples) <= limit:
        return examples
    return [examples[i * len(examples) // limit] for i in range(limit)]


def _token_loss_sum(model, batch: dict, encoder_decoder: bool) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over target tokens, and their count."""
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                **({"labels": labels} if encoder_decoder else {}))
    logits = out.logits
    if not encoder_decoder:
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


class Trainer(CheckpointedTraining):
    """Trains ``model.prefix`` on encoded examples. Use :func:`train_prefix` for the common case."""

    def __init__(self, model: PrefixModel, tokenizer, train: Sequence[Encoded], config: TrainConfig,
                 eval_set: Sequence[Encoded] = (), checkpoint_dir: str | Path | None = None,
                 callbacks: Sequence[Callback] = (), accelerator: Accelerator | None = None) -> None:
        self.config = config
        # Mixed precision is our own autocast, not Accelerator(mixed_precision=...): accelerate's
        # state is process-global and cannot change between runs in one process.
        self.acc = accelerator or Accelerator()
        self.precision: Precision = decide(config.mixed_precision, self.acc.device)
        self.autocast = torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.precision.autocast)
        self.world = self.acc.num_processes
        per_step = self.world * config.grad_accum
        if config.batch_size % per_step:
            raise ValueError(
                f"batch_size {config.batch_size} must be a multiple of processes x grad_accum = {per_step}"
            )
        if len(train) < config.batch_size:
            raise ValueError(f"{len(train)} training examples is fewer than one batch ({config.batch_size})")
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Validation batches hold examples of similar length (less padding); the loss is a sum, so order is moot.
        subset = validation_subset(eval_set, config.eval_max_examples)
        self.train_set, self.eval_set = list(train), sorted(subset, key=lambda e: len(e.prompt) + len(e.target))
        self.encoder_decoder = bool(model.base.config.is_encoder_decoder)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.callbacks = list(callbacks)
        self.model = model
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        params = [p for p in model.prefix.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
        self.torch_optimizer = optimizer  # the AdamW inside accelerate's wrapper: its state is checkpointed
        self.deepspeed = self.acc.distributed_type == DistributedType.DEEPSPEED
        self.zero_stage = self.acc.state.deepspeed_plugin.zero_stage if self.deepspeed else 0
        if self.deepspeed:
            self._configure_deepspeed()
        # The base's identity is read now: under ZeRO-3 its weights are partitioned after prepare.
        weight_fingerprint(model.base)
        self.wrapped, self.optimizer = self.acc.prepare(model, optimizer)
        self.step_hooks: list[Callable[[Trainer], None]] = []  # run on every rank after each step
        self.lengths = [len(e) for e in self.train_set]
        self.batches_per_epoch = len(self.train_set) // config.batch_size
        self.step = 0
        self.history: list[dict] = []
        self.best_eval: float | None = None
        self.best_state: dict | None = None
        self.bad_evals = 0
        self.resumed_from: int | None = None

    def _configure_deepspeed(self) -> None:
        """Fill the DeepSpeed config from this run: the engine accumulates ``grad_accum`` micro-batches
        of ``batch_size / (world x grad_accum)`` rows and clips at ``max_grad_norm``. Mixed precision
        stays our own autocast (DeepSpeed's bf16 mode would cast the frozen base to bf16)."""
        cfg = self.acc.state.deepspeed_plugin.deepspeed_config
        c = self.config
        cfg["train_micro_batch_size_per_gpu"] = c.batch_size // (self.world * c.grad_accum)
        cfg["gradient_accumulation_steps"] = c.grad_accum
        cfg["train_batch_size"] = c.batch_size
        cfg["gradient_clipping"] = float(c.max_grad_norm)
        for key in ("bf16", "fp16"):
            if cfg.get(key, {}).get("enabled") is True:
                raise ValueError(
                    f"the DeepSpeed config enables {key}; prefix training keeps the frozen base in its own dtype "
                    "and uses TrainConfig.mixed_precision (autocast) instead: set it to false or 'auto'"
                )
            cfg[key] = {**cfg.get(key, {}), "enabled": False}
        cfg["zero_allow_untested_optimizer"] = True

    # --- data -----------------------------------------------------------------------------------
    def global_batch(self, step: int) -> list[Encoded]:
        epoch, index = divmod(step, self.batches_per_epoch)
        batches = length_grouped_batches(self.lengths, self.config.batch_size, self.config.seed, epoch,
                                         self.config.group_by_length)
        return [self.train_set[i] for i in batches[index]]

    def micro_batches(self, batch: list[Encoded]) -> list[list[Encoded]]:
        mine = batch[self.acc.process_index :: self.world]
        n = self.config.grad_accum
        size = len(mine) // n
        return [mine[i * size : (i + 1) * size] for i in range(n)]

    def _tensors(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        batch = collate(examples, self.pad_id, self.encoder_decoder)
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    # --- events ---------------------------------------------------------------------------------
    def emit(self, event: dict) -> None:
        if self.acc.is_main_process:
            for cb in self.callbacks:
                cb(event)

    # --- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        self.wrapped.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        mine = self.eval_set[self.acc.process_index :: self.world]
        bs = self.config.eval_batch_size
        # Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively in
        # each one); a rank with fewer rows runs a throw-away batch.
        batches = math.ceil(math.ceil(len(self.eval_set) / self.world) / bs)
        for b in range(batches):
            part = mine[b * bs : (b + 1) * bs]
            batch = self._tensors(part or self.eval_set[:1])
            with self.autocast:
                loss, count = _token_loss_sum(self.wrapped, batch, self.encoder_decoder)
            if part:
                total += torch.tensor([loss.item(), count], dtype=torch.float64, device=self.acc.device)
        if self.world > 1:
            total = self.acc.reduce(total, reduction="sum")
        self.wrapped.train()
        return float(total[0] / max(total[1], 1))

    # --- prefix state (gathered under ZeRO-3) -----------------------------------------------------
    def prefix_state(self) -> dict[str, torch.Tensor]:
        """The full prefix parameters as float32 CPU copies. Collective under ZeRO-3 (every rank
        must call it), where each rank holds only a shard of every parameter."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.prefix.parameters()), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in self.model.prefix.state_dict().items()}
        return {k: v.detach().float().cpu().clone() for k, v in self.model.prefix.state_dict().items()}

    def consolidate(self, state: dict[str, torch.Tensor] | None = None) -> None:
        """Leave ``model.prefix`` an ordinary module holding ``state`` (default: the trained prefix).
        Under ZeRO-3 the partitioned encoder is replaced by an unpartitioned copy, so that
        ``model.prefix.fold()`` / ``model.export()`` work on any rank afterwards. Collective."""
        if self.zero_stage == 3:
            state = state if state is not None else self.prefix_state()
            plain = PrefixEncoder(self.model.config, self.model.geometry).to(self.model.prefix_device)
            plain.load_state_dict(state)
            self.model.prefix = plain
        elif state is not None:
            self.model.prefix.load_state_dict(state)

    # --- the loop -------------------------------------------------------------------------------
    def _backward_and_step(self, micro: list[list[Encoded]], step_tokens: int) -> tuple[float, float | None]:
        """One optimizer step over this rank's micro-batches; returns (this rank's loss sum, grad norm).
        The loss is scaled by world/step_tokens: DDP and DeepSpeed average gradients over ranks, so
        the update is that of sum(CE over the step's target tokens) / step_tokens."""
        total_loss = 0.0
        scale = self.world / step_tokens
        for i, part in enumerate(micro):
            tensors = self._tensors(part)
            sync = i == len(micro) - 1
            if self.deepspeed:
                # The engine accumulates until the boundary; scale_wrt_gas=False because the scale
                # above already accounts for the whole step.
                self.wrapped.set_gradient_accumulation_boundary(sync)
                with self.autocast:
                    loss_sum, _ = _token_loss_sum(self.wrapped, tensors, self.encoder_decoder)
                self.wrapped.backward(loss_sum * scale, scale_wrt_gas=False)
            else:
                ctx = self.acc.no_sync(self.wrapped) if not sync else nullcontext()
                with ctx:
                    with self.autocast:
                        loss_sum, _ = _token_loss_sum(self.wrapped, tensors, self.encoder_decoder)
                    self.acc.backward(loss_sum * scale)
            total_loss += loss_sum.item()
        return total_loss, self.apply_update()

    def apply_update(self) -> float | None:
        """The optimizer step over the accumulated gradients (clipped at ``max_grad_norm``), then the schedule's;
        returns the gradient norm before clipping."""
        if self.deepspeed:
            self.wrapped.step()  # clip (gradient_clipping), optimizer step, zero grads
            norm = self.wrapped.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
        else:
            max_norm = self.config.max_grad_norm
            grad_norm = self.acc.clip_grad_norm_(self.model.prefix.parameters(), max_norm) if max_norm > 0 else None
            grad_norm = float(grad_norm) if grad_norm is not None else None
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def start(self) -> None:
        """Before the first step: report the precision, resume from the newest checkpoint, start the clocks."""
        if self.precision.warning:
            log.warning(self.precision.warning)
        self.emit({"event": "precision", **self.precision.to_dict()})
        self.resume()
        self.wrapped.train()
        self.pace = Pace()
        self.stopped_early, self.last_loss = False, None

    @property
    def done(self) -> bool:
        return self.step >= self.config.max_steps or self.stopped_early

    def next_batch(self) -> tuple[list[Encoded], int]:
        """The current step's global batch and its target-token count."""
        batch = self.global_batch(self.step)
        return batch, target_token_count(batch)

    def end_step(self, batch: list[Encoded], total_loss: float, grad_norm: float | None) -> None:
        """After a step's update: count it, log it, validate, checkpoint and run the step hooks as due.
        Raises :class:`TrainingDiverged` (before anything of the step is logged or saved) on a non-finite loss."""
        cfg, pace = self.config, self.pace
        step_tokens = target_token_count(batch)
        if self.world > 1:
            total_loss = float(self.acc.reduce(torch.tensor(total_loss, device=self.acc.device), "sum"))
        if not math.isfinite(total_loss):
            raise TrainingDiverged(
                f"training diverged: the loss is {total_loss} at step {self.step + 1}; lower train.learning_rate "
                f"(now {cfg.learning_rate:g}) or train.max_grad_norm, or check the data for empty or extreme targets")
        self.step += 1
        self.last_loss = total_loss / step_tokens
        pace.count(sum(len(e) for e in batch))
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            evals_left = 0  # validations still to come: every eval_every steps, and one at the end
            if self.eval_set and cfg.eval_every:
                evals_left = cfg.max_steps // cfg.eval_every - self.step // cfg.eval_every
                evals_left += bool(cfg.max_steps % cfg.eval_every)
            tokens_per_s, eta = pace.window(self.step - (self.resumed_from or 0), cfg.max_steps - self.step,
                                            evals_left)
            record = {"event": "step", "step": self.step, "max_steps": cfg.max_steps, "loss": self.last_loss,
                      "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s, "grad_norm": grad_norm,
                      "eta_s": eta}
            self.history.append({k: v for k, v in record.items() if k != "event"})
            self.emit(record)
        pause_start = time.time()
        if self.eval_set and cfg.eval_every and self.step % cfg.eval_every == 0:
            self.stopped_early = self._eval_and_track()
            pace.eval_times.append(time.time() - pause_start)
        if self.checkpoint_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        pace.paused_for(time.time() - pause_start)
        for hook in self.step_hooks:
            hook(self)

    def finish(self) -> TrainResult:
        """After the last step: the final validation and checkpoint (unless the last step made them), the best
        prefix left in ``model.prefix``, and the ``end`` event."""
        cfg = self.config
        if self.eval_set and (not cfg.eval_every or self.step % cfg.eval_every):
            self._eval_and_track()
        if self.checkpoint_dir and (not cfg.checkpoint_every or self.step % cfg.checkpoint_every):
            self.save_checkpoint()
        self.consolidate(self.best_state)
        result = TrainResult(self.step, self.stopped_early, self.best_eval, self.last_loss, self.resumed_from,
                             self.pace.tokens, time.time() - self.pace.started, self.history, self.precision.to_dict())
        self.emit({"event": "end", **{k: v for k, v in asdict(result).items() if k != "history"}})
        return result

    def run(self) -> TrainResult:
        self.start()
        while not self.done:
            batch, step_tokens = self.next_batch()
            total_loss, grad_norm = self._backward_and_step(self.micro_batches(batch), step_tokens)
            self.end_step(batch, total_loss, grad_norm)
        return self.finish()

    def _eval_and_track(self) -> bool:
        started = time.time()
        loss = self.evaluate()
        seconds = time.time() - started
        first = self.best_eval is None
        # Significant: lower than the best by more than min_delta (resets patience); any lower loss
        # still becomes the best, whose prefix is the one kept.
        significant = first or loss < self.best_eval - self.config.early_stopping_min_delta
        if first or loss < self.best_eval:
            self.best_eval = loss
            self.best_state = self.prefix_state()
        self.bad_evals = 0 if significant else self.bad_evals + 1
        self.history.append({"step": self.step, "eval_loss": loss})
        self.emit({"event": "eval", "step": self.step, "eval_loss": loss, "best_eval_loss": self.best_eval,
                   "examples": len(self.eval_set), "seconds": seconds})
        patience = self.config.early_stopping_patience
        return bool(patience and self.bad_evals >= patience)


def train_prefix(model: PrefixModel, tokenizer, train: Sequence[Example], template: str, config: TrainConfig,
                 eval_examples: Sequence[Example] = (), checkpoint_dir: str | Path | None = None,
                 callbacks: Sequence[Callback] = (), accelerator: Accelerator | None = None) -> TrainResult:
    """Tokenize ``train``/``eval_examples`` with ``template`` and train ``model.prefix``.
    Resumes from the newest complete checkpoint in ``checkpoint_dir`` if there is one."""
    enc_dec = bool(model.base.config.is_encoder_decoder)
    train_enc = encode(tokenizer, list(train), template, config.max_length, encoder_decoder=enc_dec)
    eval_enc = encode(tokenizer, list(eval_examples), template, config.max_length, encoder_decoder=enc_dec) \
        if eval_examples else []
    trainer = Trainer(model, tokenizer, train_enc, config, eval_enc, checkpoint_dir, callbacks, accelerator)
    return trainer.run()

