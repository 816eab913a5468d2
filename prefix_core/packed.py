"""Packed training: several prefixes trained together in one process, on one frozen base loaded once.

Each member is a :class:`~prefix_core.train.Trainer` over its own :class:`~prefix_core.model.PrefixModel`, and
all of them share one base module. A member keeps everything of its own: its prefix (and MLP), optimizer,
learning-rate schedule, data order, validation set, early stopping, checkpoint folder, events and result.

A step of the pack is one step of every active member. Their micro-batches are forwarded together, at most
``rows_per_forward`` rows per forward (a member's micro-batch is never split across forwards): each row attends
to its own member's prefix (``prefix_rows`` into a bank built from the members' live prefixes, so gradients flow
back to each), and a member's loss is the cross-entropy summed over its own rows' target tokens, divided by its
own step's target-token count. A member's gradient therefore comes from its own rows only, and it trains as it
would alone, up to the float rounding of a larger batch (fp32: within 1e-5 of alone after 20 steps,
``tests/test_packed.py``), whatever else is in the pack.

Members finish at different steps (``max_steps``, early stopping) and leave the pack; ``on_finish`` gets each
result at once (the job writes that member's artifact while the others train on). A member whose step raises (a
non-finite loss: :class:`~prefix_core.errors.TrainingDiverged`; a row that breaks its forward) leaves the pack
with its error and the others go on: a forward shared by several members that raises is run again member by
member, so only the member at fault fails. Nothing in a step draws random numbers (the base is in eval mode, a
prefix has no dropout, and data order is a pure function of (seed, step)), so the members share the process RNG.

What each member costs (:meth:`PackedTraining.usage`): the pack's wall and CPU time is charged in contiguous
segments, so the members' charges add up to the pack's time: a shared forward and backward to its members by
their tokens in it, a member's own update, validation, checkpoint and end to that member, and the set-up before
the first step (``started_at``: loading the base once) in equal parts.

One process only (``strategy: single`` on any one device); DDP and DeepSpeed trainings run alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import PrefixKV
from .data import IGNORE, Encoded, collate
from .model import ensure_prefix_attention, prefix_positions
from .train import Trainer, TrainResult
from .train_pace import clock

log = logging.getLogger(__name__)

ROWS_PER_FORWARD = 32  # default: rows of all members in one forward (memory grows with it; members never split)


@dataclass
class _Step:
    """One member's current step: its global batch, target tokens and micro-batches."""

    batch: list[Encoded]
    tokens: int
    micro: list[list[Encoded]]

    @property
    def input_tokens(self) -> int:
        """Tokens of the step's rows (what the member's tokens trained count, as ``TrainResult.train_tokens``)."""
        return sum(len(e) for e in self.batch)


@dataclass
class Charge:
    """What one member of a pack has cost so far: wall and CPU seconds (its share), tokens trained (input tokens
    of its steps' rows)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    tokens: int = 0


class Ledger:
    """Charges the time between consecutive :meth:`charge` calls to members, split by weight; ``charges``: name ->
    :class:`Charge`. ``started_at``: the first reading of ``clock`` (default: now)."""

    def __init__(self, members: Sequence[str], started_at: tuple[float, float] | None = None,
                 clock: Callable[[], tuple[float, float]] = clock) -> None:
        self.clock = clock
        self.last = started_at or clock()
        self.charges = {name: Charge() for name in members}

    def charge(self, weights: Mapping[str, float]) -> None:
        """The time since the last charge, split over ``weights``' members in proportion (equal if all are 0)."""
        now = self.clock()
        wall, cpu = now[0] - self.last[0], now[1] - self.last[1]
        self.last = now
        total = sum(weights.values())
        for name, weight in weights.items():
            part = weight / total if total > 0 else 1.0 / len(weights)
            self.charges[name].wall_s += wall * part
            self.charges[name].cpu_s += cpu * part


class PackedTraining:
    """Train ``trainers`` (name -> Trainer, all over one shared base) together; see the module docstring.
    ``started_at``: the :func:`~prefix_core.train_pace.clock` reading when the pack's set-up began (default: now);
    the set-up is charged to all members equally."""

    def __init__(self, trainers: Mapping[str, Trainer], rows_per_forward: int = ROWS_PER_FORWARD,
                 started_at: tuple[float, float] | None = None) -> None:
        if not trainers:
            raise ValueError("a pack needs at least one member")
        if rows_per_forward < 1:
            raise ValueError(f"rows_per_forward must be at least 1; got {rows_per_forward}")
        first = next(iter(trainers.values()))
        self.base = first.model.base
        for name, t in trainers.items():
            if t.model.base is not self.base:
                raise ValueError(f"pack member {name!r} has a base model of its own; the members must share one")
            if t.world > 1 or t.deepspeed:
                raise ValueError("packed training runs in one process without DeepSpeed (strategy single); "
                                 f"member {name!r} runs on {t.world} process(es)")
            if t.precision.autocast != first.precision.autocast:
                raise ValueError(f"pack member {name!r} trains in {t.precision.mode}, another in "
                                 f"{first.precision.mode}; a pack trains in one precision")
        self.trainers = dict(trainers)
        self.rows_per_forward = rows_per_forward
        self.encoder_decoder = first.encoder_decoder
        self.pad_id, self.device, self.autocast = first.pad_id, first.acc.device, first.autocast
        self.ledger = Ledger(list(self.trainers), started_at)

    def usage(self, name: str) -> Charge:
        """What member ``name`` has cost so far, with the time since the last charge (e.g. writing its artifact in
        ``on_finish``) charged to it."""
        self.ledger.charge({name: 1.0})
        return self.ledger.charges[name]

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, on_finish: Callable[[str, TrainResult], None] | None = None,
            on_fail: Callable[[str, Exception], None] | None = None) -> dict[str, TrainResult | Exception]:
        """Train every member to its end; returns name -> its result, or the exception it failed with.
        ``on_finish(name, result)`` runs as a member ends (an exception in it fails that member);
        ``on_fail(name, error)`` as a member fails."""
        outcomes: dict[str, TrainResult | Exception] = {}
        active: dict[str, Trainer] = {}
        ledger = self.ledger
        ledger.charge(dict.fromkeys(self.trainers, 1.0))  # the set-up: one base for all

        def fail(name: str, err: Exception) -> None:
            active.pop(name, None)
            outcomes[name] = err
            log.warning("pack member %s failed: %s", name, err)
            if on_fail is not None:
                on_fail(name, err)

        def finish(name: str) -> None:
            try:
                try:
                    result = active.pop(name).finish()
                finally:
                    ledger.charge({name: 1.0})
                if on_finish is not None:
                    on_finish(name, result)
            except Exception as err:  # its final validation, checkpoint or artifact
                fail(name, err)
                return
            outcomes[name] = result

        for name, trainer in self.trainers.items():
            try:
                trainer.start()
            except Exception as err:  # an unreadable checkpoint of its own, ...
                fail(name, err)
                continue
            finally:
                ledger.charge({name: 1.0})
            active[name] = trainer
            if trainer.done:  # resumed at its end
                finish(name)
        while active:
            steps = {name: self._step_of(t) for name, t in active.items()}
            losses: dict[str, float] = {}
            for chunk in self._chunks(steps):
                losses.update(self._backward_guarded(chunk, steps, fail))
                ledger.charge({name: steps[name].input_tokens for name in chunk})
            for name, loss in losses.items():
                trainer = active[name]
                ledger.charges[name].tokens += steps[name].input_tokens
                try:
                    trainer.end_step(steps[name].batch, loss, trainer.apply_update())
                except Exception as err:
                    fail(name, err)
                    continue
                finally:
                    ledger.charge({name: 1.0})
                if trainer.done:
                    finish(name)
        return outcomes

    @staticmethod
    def _step_of(trainer: Trainer) -> _Step:
        batch, tokens = trainer.next_batch()
        return _Step(batch, tokens, trainer.micro_batches(batch))

    def _chunks(self, steps: Mapping[str, _Step]) -> list[list[str]]:
        """Members grouped, in order, so that one micro-batch of each member of a group fits ``rows_per_forward``."""
        chunks: list[list[str]] = []
        rows = 0
        for name, step in steps.items():
            size = max(len(m) for m in step.micro)
            if chunks and rows + size <= self.rows_per_forward:
                chunks[-1].append(name)
                rows += size
            else:
                chunks.append([name])
                rows = size
        return chunks

    def _backward_guarded(self, chunk: list[str], steps: Mapping[str, _Step],
                          fail: Callable[[str, Exception], None]) -> dict[str, float]:
        """Backward of ``chunk``'s step; if a forward shared by several members raises, each member again alone
        (its gradients zeroed first), so that only the member at fault fails."""
        try:
            return self._backward(chunk, steps)
        except Exception as err:
            if len(chunk) == 1:
                fail(chunk[0], err)
                return {}
        losses = {}
        for name in chunk:
            self.trainers[name].optimizer.zero_grad(set_to_none=True)
            try:
                losses.update(self._backward([name], steps))
            except Exception as err:
                fail(name, err)
        return losses

    # --- one shared forward and backward -----------------------------------------------------------
    def _bank(self, names: Sequence[str]) -> PrefixKV:
        """The members' current prefixes as one bank (index j = ``names[j]``), padded to the longest; built from
        the live parameters, so the backward reaches every member's prefix."""
        kvs = [self.trainers[n].model.prefix_kv() for n in names]
        p_max = max(int(kv.valid.shape[-1]) for kv in kvs)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, 0, 0, p_max - t.shape[2])) if t.shape[2] < p_max else t

        keys = [torch.cat([pad(kv.keys[s]) for kv in kvs]) for s in range(len(kvs[0].keys))]
        values = [torch.cat([pad(kv.values[s]) for kv in kvs]) for s in range(len(kvs[0].values))]
        valid = torch.cat([F.pad(kv.valid, (0, p_max - kv.valid.shape[-1])) for kv in kvs])
        return PrefixKV(keys, values, valid)

    def _backward(self, names: list[str], steps: Mapping[str, _Step]) -> dict[str, float]:
        """Forward and backward of ``names``' micro-batches (micro-batch i of every member together); returns each
        member's loss sum over its step."""
        ensure_prefix_attention(self.base)
        totals = dict.fromkeys(names, 0.0)
        scales = torch.tensor([1.0 / steps[n].tokens for n in names], dtype=torch.float32, device=self.device)
        for i in range(max(len(steps[n].micro) for n in names)):
            part = [(j, n) for j, n in enumerate(names) if i < len(steps[n].micro)]
            examples = [e for _, n in part for e in steps[n].micro[i]]
            rows = torch.tensor([j for j, n in part for _ in steps[n].micro[i]], device=self.device)
            batch = {k: v.to(self.device) for k, v in collate(examples, self.pad_id, self.encoder_decoder).items()}
            with self.autocast:
                bank = self._bank(names)
                row_loss = self._row_losses(batch, bank, rows)
            sums = torch.zeros(len(names), dtype=row_loss.dtype, device=self.device).index_add(0, rows, row_loss)
            (sums * scales).sum().backward()
            values = sums.tolist()
            for j, n in part:
                totals[n] += values[j]
        return totals

    def _row_losses(self, batch: dict[str, torch.Tensor], bank: PrefixKV, rows: torch.Tensor) -> torch.Tensor:
        """Cross-entropy summed over each row's target tokens, ``[B]`` in float32."""
        labels, mask = batch["labels"], batch["attention_mask"]
        kwargs = {"labels": labels} if self.encoder_decoder else \
            {"position_ids": prefix_positions(mask, bank.lengths[rows])}
        out = self.base(input_ids=batch["input_ids"], attention_mask=mask, prefix_kv=bank, prefix_rows=rows,
                        use_cache=False, **kwargs)
        logits = out.logits
        if not self.encoder_decoder:
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="none")
        return loss.view(labels.shape).sum(-1)
