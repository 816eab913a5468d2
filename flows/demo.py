"""The main job on embedded defaults: train a prefix for the demo task on SmolLM2-135M and show
generations before and after. No server, no GPU, no account."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prefix_core import (
    DEFAULT_MODEL,
    MultiPrefixGenerator,
    PrefixArtifact,
    PrefixConfig,
    PrefixModel,
    TrainConfig,
    load_base_model,
    train_prefix,
)

from .demo_task import TEMPLATE, split


@dataclass
class DemoResult:
    artifact_dir: Path
    exact_before: float
    exact_after: float
    rows: list[tuple[str, str, str, str]]  # source, before, after, reference
    train_seconds: float
    trainable_share: float  # trainable parameters (embedding + MLP) / base parameters
    folded_share: float  # values in the folded prefix (what is served and stored) / base parameters


def run_demo(state_dir: Path, steps: int = 150, model_name: str = DEFAULT_MODEL, on_event=None) -> DemoResult:
    """Train on the generated demo task, save the artifact under ``state_dir``, and compare greedy
    generations on held-out records without and with the prefix."""
    train, val, test = split(seed=0)
    base, tok = load_base_model(model_name)
    model = PrefixModel(base, PrefixConfig(num_virtual_tokens=10, projection_hidden=512))
    config = TrainConfig(max_steps=steps, batch_size=8, learning_rate=3e-3, warmup_steps=10,
                         mixed_precision="bf16", log_every=10, eval_every=max(steps // 3, 1))
    t0 = time.time()
    train_prefix(model, tok, train, TEMPLATE, config, eval_examples=val,
                 checkpoint_dir=state_dir / "checkpoints", callbacks=[on_event] if on_event else [])
    seconds = time.time() - t0
    art = model.export(prompt_template=TEMPLATE, training={"steps": steps, **config.to_dict()})
    path = art.save(state_dir / "prefix")
    gen = MultiPrefixGenerator(base, tok, {"demo": PrefixArtifact.load(path)})
    requests = [(name, e.source) for name in (None, "demo") for e in test]
    texts = [t.strip() for t in gen.generate([(n, TEMPLATE.format(source=s)) for n, s in requests],
                                             max_new_tokens=40, do_sample=False)]
    before, after = texts[: len(test)], texts[len(test) :]
    rows = [(e.source, b, a, e.target) for e, b, a in zip(test, before, after, strict=True)]
    base_params = sum(p.numel() for p in base.parameters())
    return DemoResult(path, _exact(before, test), _exact(after, test), rows, seconds,
                      model.trainable_parameters() / base_params, art.table().numel() / base_params)


def _exact(texts, examples) -> float:
    return sum(t == e.target for t, e in zip(texts, examples, strict=True)) / len(examples)
