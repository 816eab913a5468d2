"""Precision by hardware: bf16 only where native, decided once per job, recorded, warned about when forced."""

from __future__ import annotations

import logging

import pytest
import torch

from prefix_core import Example, PrefixConfig, PrefixModel, TrainConfig, precision, train_prefix
from support.tiny_models import make_base


@pytest.fixture(params=[True, False], ids=["bf16-native", "not-native"])
def native(request, monkeypatch):
    """Pretend the CPU has (or lacks) native bf16, whatever this machine has."""
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: request.param)
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AMX" if request.param else "AVX2")
    return request.param


def test_auto_follows_the_hardware(native):
    p = precision.decide("auto", "cpu")
    assert p.mode == ("bf16" if native else "fp32") and p.native is native and p.warning is None
    assert p.dtype == (torch.bfloat16 if native else torch.float32) and p.autocast is native
    assert p.reason == ("bf16 is native on this CPU (AMX): bf16" if native else
                        "bf16 is not native on this CPU (AVX2): fp32")


def test_explicit_choices(native):
    for spelling in ("fp32", "no", "FP32"):
        p = precision.decide(spelling, "cpu")
        assert (p.mode, p.requested, p.warning) == ("fp32", "fp32", None)
    forced = precision.decide("bf16", "cpu")
    assert forced.mode == "bf16"
    if native:
        assert forced.warning is None
    else:
        assert "no native bf16" in forced.warning and "30x slower" in forced.warning and "auto" in forced.warning
    with pytest.raises(ValueError, match="auto, fp32"):
        precision.decide("fp16")


EXAMPLES = [Example(f"{i}", ["aaa", "bbb"][i % 2]) for i in range(16)]


def _train(tok, mixed_precision: str, events: list):
    model = PrefixModel(make_base("llama"), PrefixConfig(num_virtual_tokens=2, projection_hidden=8))
    cfg = TrainConfig(max_steps=2, batch_size=8, log_every=1, mixed_precision=mixed_precision)
    return train_prefix(model, tok, EXAMPLES, "n {source} :", cfg, callbacks=[events.append])


def test_training_decides_once_and_reports_it(tok, native):
    events = []
    result = _train(tok, "auto", events)
    decided = [e for e in events if e["event"] == "precision"]
    assert len(decided) == 1 and decided[0]["mode"] == ("bf16" if native else "fp32")
    assert result.precision == {k: v for k, v in decided[0].items() if k != "event"}


def test_forced_bf16_on_a_cpu_without_it_warns(tok, monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(precision, "cpu_capability", lambda: "AVX2")
    events = []
    with caplog.at_level(logging.WARNING, logger="prefix_core.train"):
        result = _train(tok, "bf16", events)
    assert result.precision["mode"] == "bf16" and "AVX2" in result.precision["warning"]
    assert [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
