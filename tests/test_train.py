"""The training loop: learning, exact resume, checkpoint safety, accumulation, early stopping."""

import json
import logging
import math

import pytest
import torch

from prefix_core import Example, PrefixConfig, PrefixModel, TrainConfig, train_prefix
from prefix_core import checkpoint as ckpt
from prefix_core.data import collate, encode, length_grouped_batches
from prefix_core.train import _token_loss_sum
from support.tiny_models import make_base

TEMPLATE = "n {source} :"
EXAMPLES = [Example(f"{i}", ["aaa", "bbb", "ccc"][i % 3] + " " * (i % 4)) for i in range(48)]


class Crash(Exception):
    pass


def crash_at(step):
    def cb(event):
        if event["event"] == "checkpoint" and event["step"] == step:
            raise Crash

    return cb


def run(tok, family="llama", ckdir=None, callbacks=(), **overrides):
    model = PrefixModel(make_base(family), PrefixConfig(num_virtual_tokens=3, projection_hidden=16))
    cfg = TrainConfig(**{"max_steps": 12, "batch_size": 8, "learning_rate": 1e-2, "log_every": 2,
                         "checkpoint_every": 4, "mixed_precision": "no", **overrides})
    result = train_prefix(model, tok, EXAMPLES, TEMPLATE, cfg, eval_examples=EXAMPLES[:8], checkpoint_dir=ckdir,
                          callbacks=callbacks)
    return model, result


def test_training_lowers_loss_and_reports_progress(tok):
    events = []
    _, result = run(tok, max_steps=30, eval_every=10, learning_rate=5e-2, callbacks=[events.append])
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert losses[-1] < losses[0] - 0.3
    step = next(e for e in events if e["event"] == "step")
    assert {"step", "max_steps", "loss", "lr", "tokens_per_s", "eta_s", "grad_norm"} <= step.keys()
    assert [e["step"] for e in events if e["event"] == "eval"] == [10, 20, 30]
    assert events[-1]["event"] == "end" and result.steps == 30


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_resume_after_crash_gives_identical_prefix(tmp_path, tok, family):
    uninterrupted, _ = run(tok, family, eval_every=4)
    with pytest.raises(Crash):
        run(tok, family, tmp_path, [crash_at(8)], eval_every=4)
    resumed, result = run(tok, family, tmp_path, eval_every=4)
    assert result.resumed_from == 8
    assert torch.equal(resumed.prefix.fold(), uninterrupted.prefix.fold())


def test_incomplete_and_corrupt_checkpoints_are_skipped(tmp_path, tok, caplog):
    with pytest.raises(Crash):
        run(tok, ckdir=tmp_path, callbacks=[crash_at(8)], keep_checkpoints=5)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000008", "step-00000004"]
    # A half-written checkpoint (no marker) and a corrupt newest one must not be loaded.
    half = tmp_path / "step-00000012"
    half.mkdir()
    (half / "state.json").write_text(json.dumps({"step": 12}))
    (tmp_path / "step-00000008" / "trainable.safetensors").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        _, result = run(tok, ckdir=tmp_path, keep_checkpoints=5)
    assert result.resumed_from == 4
    assert "skipping checkpoint" in caplog.text


def test_checkpoints_are_pruned(tmp_path, tok):
    run(tok, ckdir=tmp_path, keep_checkpoints=2)
    assert [p.name for p in tmp_path.iterdir()] == sorted(["step-00000012", "step-00000008"], reverse=True) or \
        sorted(p.name for p in tmp_path.iterdir()) == ["step-00000008", "step-00000012"]


def test_gradient_accumulation_matches_full_batch(tok):
    full, _ = run(tok, max_steps=6)
    accum, _ = run(tok, max_steps=6, grad_accum=4)
    assert torch.allclose(full.prefix.fold(), accum.prefix.fold(), atol=1e-5)


def test_gradient_checkpointing_and_bf16_train(tok):
    gc, _ = run(tok, max_steps=4, gradient_checkpointing=True)
    plain, _ = run(tok, max_steps=4)
    assert torch.allclose(gc.prefix.fold(), plain.prefix.fold(), atol=1e-5)
    _, result = run(tok, max_steps=4, mixed_precision="bf16")
    assert result.final_train_loss is not None and math.isfinite(result.final_train_loss)
    assert result.precision["mode"] == "bf16" and result.precision["requested"] == "bf16"


def test_early_stopping_restores_best(tok):
    events = []
    model, result = run(tok, max_steps=200, learning_rate=3.0, eval_every=2, early_stopping_patience=2,
                        callbacks=[events.append])
    evals = [e["eval_loss"] for e in events if e["event"] == "eval"]
    assert result.stopped_early and result.steps < 200
    assert result.best_eval_loss == min(evals) and evals[-1] > min(evals)
    batch = collate(encode(tok, EXAMPLES[:8], TEMPLATE, 256), pad_id=0)
    with torch.no_grad():
        loss, count = _token_loss_sum(model, batch, encoder_decoder=False)
    assert abs(loss.item() / count - result.best_eval_loss) < 1e-4  # the best prefix was restored


def test_early_stopping_min_delta_stops_on_a_plateau(tok):
    """Improvements smaller than min_delta do not reset the patience, but the lowest loss is still kept."""
    events = []
    _, result = run(tok, max_steps=200, learning_rate=5e-2, eval_every=2, early_stopping_patience=2,
                    early_stopping_min_delta=10.0, callbacks=[events.append])
    evals = [e["eval_loss"] for e in events if e["event"] == "eval"]
    assert result.stopped_early and result.steps == 6 and len(evals) == 3
    assert evals[-1] < evals[0] and result.best_eval_loss == min(evals)
    _, strict = run(tok, max_steps=200, learning_rate=5e-2, eval_every=2, early_stopping_patience=2)
    assert strict.steps > 6  # without min_delta the same improvements count


def test_length_grouped_batches_are_deterministic_and_reduce_padding():
    lengths = [((i * 37) % 50) + 1 for i in range(400)]
    a = length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert a == length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert a != length_grouped_batches(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(400))
    random_ = length_grouped_batches(lengths, 8, seed=1, epoch=0, group=False)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(a) < padding(random_) / 3


def test_truncation_keeps_target_and_flags(tok):
    [e] = encode(tok, [Example("x" * 100, "abcdef")], TEMPLATE, max_length=20)
    assert e.truncated and len(e) <= 20 and e.target[0] == tok.convert_tokens_to_ids(" ")


def test_bad_settings(tok):
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="mixed_precision must be 'auto'"):
        TrainConfig(mixed_precision="fp16")
    with pytest.raises(ValueError, match="early_stopping_min_delta"):
        TrainConfig(early_stopping_min_delta=-1)
    with pytest.raises(ValueError, match="multiple"):
        run(tok, batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        run(tok, batch_size=64)
    with pytest.raises(ValueError, match="source"):
        encode(tok, EXAMPLES, "no placeholder", 32)


def test_validation_is_a_fixed_bounded_subset():
    from prefix_core.train import validation_subset

    items = list(range(1000))
    subset = validation_subset(items, 200)
    assert len(subset) == 200 and subset == validation_subset(items, 200)  # the same every time
    assert subset[0] == 0 and subset[-1] >= 990 and subset == sorted(set(subset))  # spread over the whole set
    assert validation_subset(items, 0) == items and validation_subset(items[:50], 200) == items[:50]
    with pytest.raises(ValueError, match="eval_max_examples"):
        TrainConfig(eval_max_examples=-1)


def test_validation_time_stays_out_of_tokens_per_s_and_is_reported_on_its_own(tok, monkeypatch):
    """A validation that takes 1000 s (a fake clock) must not drag tokens/s down; the ETA counts the
    validations still to come at their mean time; each eval event says how many examples and how long."""
    import prefix_core.train as train_mod

    offset = [0.0]
    real_time = train_mod.time.time
    monkeypatch.setattr(train_mod.time, "time", lambda: real_time() + offset[0])
    original = train_mod.Trainer.evaluate

    def slow_evaluate(self):
        offset[0] += 1000.0
        return original(self)

    monkeypatch.setattr(train_mod.Trainer, "evaluate", slow_evaluate)
    events = []
    _, bounded = run(tok, max_steps=30, eval_every=10, eval_max_examples=3, callbacks=[events.append])
    steps = [e for e in events if e["event"] == "step"]
    evals = [e for e in events if e["event"] == "eval"]
    assert all(e["tokens_per_s"] > 20 for e in steps)  # 1000 s in a window would give < 1 token/s
    at_20 = next(e for e in steps if e["step"] == 20)
    assert 1000 <= at_20["eta_s"] < 1100  # one validation (step 30) still to come, at its mean time
    assert all(e["examples"] == 3 and e["seconds"] >= 1000 for e in evals)
    # the bounded loss is the loss of the subset: the same as validating on exactly those examples
    offset[0] = 0.0
    monkeypatch.setattr(train_mod.Trainer, "evaluate", original)
    subset = train_mod.validation_subset(EXAMPLES[:8], 3)
    model = PrefixModel(make_base("llama"), PrefixConfig(num_virtual_tokens=3, projection_hidden=16))
    cfg = TrainConfig(max_steps=30, batch_size=8, learning_rate=1e-2, log_every=2, checkpoint_every=4,
                      mixed_precision="no", eval_every=10, eval_max_examples=0)
    whole = train_prefix(model, tok, EXAMPLES, TEMPLATE, cfg, eval_examples=subset)
    assert whole.best_eval_loss == pytest.approx(bounded.best_eval_loss, rel=1e-5)
