"""Packed training (prefix_core.packed): members trained together on one shared base train as they would alone,
fail alone, and resume each from its own checkpoint."""

import math

import pytest
import torch
from accelerate import Accelerator

from prefix_core import Example, PrefixConfig, PrefixModel, TrainConfig, TrainingDiverged
from prefix_core.data import encode
from prefix_core.packed import Ledger, PackedTraining
from prefix_core.train import Trainer
from support.tiny_models import make_base

TEMPLATE = "n {source} :"
# Three clients: different data (sizes, targets, lengths), prefix lengths, MLP or not, step counts, batch
# splits and validation schedules.
CLIENTS = {
    "a": dict(rows=40, words=["aaa", "bbb"], prefix=PrefixConfig(num_virtual_tokens=3, projection_hidden=16, seed=1),
              train=dict(max_steps=20, batch_size=8, eval_every=5)),
    "b": dict(rows=24, words=["cc", "dddd", "e"], prefix=PrefixConfig(num_virtual_tokens=5, projection_hidden=None,
                                                                        seed=2),
              train=dict(max_steps=12, batch_size=4, grad_accum=2, eval_every=4)),
    "c": dict(rows=64, words=["ffff ggg", "hh"], prefix=PrefixConfig(num_virtual_tokens=2, projection_hidden=8,
                                                                      seed=3),
              train=dict(max_steps=16, batch_size=8, eval_every=0, learning_rate=3e-2)),
}


def examples(name, rows, words):
    return [Example(f"{name}{i}", words[i % len(words)] + " x" * (i % 3)) for i in range(rows)]


def trainer(base, tok, name, ckdir=None, callbacks=(), **overrides):
    c = CLIENTS[name]
    data = encode(tok, examples(name, c["rows"], c["words"]), TEMPLATE, 64)
    cfg = TrainConfig(**{"learning_rate": 1e-2, "log_every": 2, "checkpoint_every": 4, "mixed_precision": "no",
                         "seed": ord(name), **c["train"], **overrides})
    model = PrefixModel(base, c["prefix"])
    return Trainer(model, tok, data, cfg, data[:6], ckdir, callbacks, Accelerator(cpu=True))


def alone(tok, name, **overrides):
    t = trainer(make_base("llama"), tok, name, **overrides)
    return t.run(), t.model.prefix.fold()


@pytest.mark.parametrize("rows_per_forward", [64, 1])
def test_each_packed_client_equals_the_same_client_trained_alone(tok, rows_per_forward):
    base = make_base("llama")
    trainers = {name: trainer(base, tok, name) for name in CLIENTS}
    finished = []
    outcomes = PackedTraining(trainers, rows_per_forward).run(on_finish=lambda name, r: finished.append(name))
    assert finished == ["b", "c", "a"]  # they leave the pack as their step budgets run out
    for name in CLIENTS:
        result, table = alone(tok, name)
        packed = outcomes[name]
        assert packed.steps == result.steps == CLIENTS[name]["train"]["max_steps"]
        assert (table - trainers[name].model.prefix.fold()).abs().max().item() < 1e-5, name
        assert packed.best_eval_loss == pytest.approx(result.best_eval_loss, abs=1e-5)
        assert [h.get("loss") for h in packed.history] == pytest.approx([h.get("loss") for h in result.history],
                                                                          abs=1e-5)


def test_the_ledger_splits_each_stretch_of_time_by_weight():
    ticks = iter([(14.0, 7.0), (15.0, 9.0), (21.0, 9.0)])
    ledger = Ledger(["a", "b"], started_at=(10.0, 5.0), clock=lambda: next(ticks))
    ledger.charge({"a": 3, "b": 1})  # 4 s wall, 2 s CPU by tokens 3:1
    ledger.charge({"b": 1.0})  # 1 s, 2 s: b's own
    ledger.charge({"a": 0, "b": 0})  # 6 s, 0 s: equal parts
    assert (ledger.charges["a"].wall_s, ledger.charges["a"].cpu_s) == (3.0 + 3.0, 1.5)
    assert (ledger.charges["b"].wall_s, ledger.charges["b"].cpu_s) == (1.0 + 1.0 + 3.0, 0.5 + 2.0)


def test_the_packs_time_is_charged_to_its_members_and_adds_up_to_the_whole(tok):
    from prefix_core.train_pace import clock

    base = make_base("llama")
    trainers = {name: trainer(base, tok, name) for name in CLIENTS}
    started = clock()
    pack = PackedTraining(trainers, started_at=started)
    outcomes = pack.run()
    charges, end = pack.ledger.charges, pack.ledger.last
    assert sum(c.wall_s for c in charges.values()) == pytest.approx(end[0] - started[0], rel=1e-9)
    assert sum(c.cpu_s for c in charges.values()) == pytest.approx(end[1] - started[1], rel=1e-9)
    for name in CLIENTS:  # tokens: each member's own rows, as the member counts them itself
        assert charges[name].tokens == outcomes[name].train_tokens > 0
        assert charges[name].wall_s > 0 and charges[name].cpu_s > 0


def test_a_client_whose_loss_diverges_fails_alone_and_the_others_finish(tok):
    base = make_base("llama")
    trainers = {name: trainer(base, tok, name) for name in CLIENTS}
    with torch.no_grad():  # a prefix that cannot give a finite loss
        next(trainers["b"].model.prefix.parameters()).fill_(math.inf)
    failed = {}
    outcomes = PackedTraining(trainers).run(on_fail=failed.__setitem__)
    assert list(failed) == ["b"] and isinstance(outcomes["b"], TrainingDiverged)
    assert "diverged" in str(outcomes["b"]) and "learning_rate" in str(outcomes["b"])
    for name in ("a", "c"):
        _, table = alone(tok, name)
        assert (table - trainers[name].model.prefix.fold()).abs().max().item() < 1e-5


def test_a_client_whose_rows_break_the_forward_fails_alone(tok):
    base = make_base("llama")
    trainers = {name: trainer(base, tok, name) for name in CLIENTS}
    bad = trainers["a"].train_set[0]
    trainers["a"].train_set[0] = type(bad)(bad.prompt, [10**6] * len(bad.target), bad.truncated)  # not in the vocab
    trainers["a"].lengths[0] = len(trainers["a"].train_set[0])
    outcomes = PackedTraining(trainers).run()
    assert isinstance(outcomes["a"], Exception) and not isinstance(outcomes["a"], TrainingDiverged)
    assert outcomes["b"].steps == 12 and outcomes["c"].steps == 16


class Killed(Exception):
    pass


def test_a_killed_pack_resumes_each_client_from_its_own_checkpoint(tmp_path, tok):
    base = make_base("llama")
    uninterrupted = {name: trainer(base, tok, name) for name in CLIENTS}
    PackedTraining(uninterrupted).run()

    def kill_at(step):
        def hook(t):
            if t.step == step:
                raise Killed

        return hook

    base = make_base("llama")
    first = {name: trainer(base, tok, name, tmp_path / name) for name in CLIENTS}
    first["a"].step_hooks.append(kill_at(10))  # "a" dies at step 10: the process goes down with it
    with pytest.raises(Killed):
        _run_until_killed(first)
    base = make_base("llama")
    resumed = {name: trainer(base, tok, name, tmp_path / name) for name in CLIENTS}
    outcomes = PackedTraining(resumed).run()
    assert {n: o.resumed_from for n, o in outcomes.items()} == {"a": 8, "b": 8, "c": 8}
    for name in CLIENTS:
        assert torch.equal(resumed[name].model.prefix.fold(), uninterrupted[name].model.prefix.fold()), name


def _run_until_killed(trainers):
    """A kill takes the whole process down: the hook's exception must not be taken as one member's failure."""

    def reraise(name, err):
        raise err

    PackedTraining(trainers).run(on_fail=reraise)
