"""PrefixModel semantics on tiny random models of every family."""

import hashlib

import pytest
import torch
import torch.nn.functional as F

from prefix_core import PrefixConfig, PrefixModel, UnsupportedModelError, geometry_from_config
from prefix_core.model import text_table
from support.tiny_models import DECODER_ONLY, batch, make_base


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().numpy().tobytes())
    return h.hexdigest()


def inputs(tok, family, texts=("hello world", "ab"), side="right"):
    enc = batch(tok, list(texts), side)
    kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if family == "bart":
        kw["decoder_input_ids"] = batch(tok, ["xy z", "q"], "right")["input_ids"]
    return kw


def test_geometry_from_config(family):
    g = geometry_from_config(make_base(family).config)
    kinds = {s.kind for s in g.sites}
    if family == "bart":
        assert kinds == {"encoder", "decoder", "cross"} and len(g.sites) == 6
    else:
        assert kinds == {"decoder"} and len(g.sites) == 2
    expected = {"llama": (2, 16), "qwen2": (1, 16), "mistral": (2, 24), "gpt2": (4, 16), "bart": (4, 16)}[family]
    assert (g.sites[0].kv_heads, g.sites[0].head_dim) == expected


def test_base_frozen_and_unchanged_by_training(tok, family):
    base = make_base(family)
    before = weights_hash(base)
    model = PrefixModel(base, PrefixConfig(num_virtual_tokens=3, projection_hidden=8))
    assert all(not p.requires_grad for p in base.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()
                                                                          if n.startswith("prefix.")}
    opt = torch.optim.AdamW(model.prefix.parameters(), lr=0.1)
    model.train()
    assert not base.training and model.prefix.training
    for _ in range(3):
        kw = inputs(tok, family)
        out = model(**kw, labels=kw.get("decoder_input_ids", kw["input_ids"]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert weights_hash(base) == before
    assert all(p.grad is None for p in base.parameters())


def test_prefix_changes_output_and_base_stays_usable_bare(tok, family):
    base = make_base(family)
    kw = inputs(tok, family)
    ref = base(**kw).logits
    model = PrefixModel(base, PrefixConfig(num_virtual_tokens=4, projection_hidden=None))
    assert (model(**kw).logits - ref).abs().max() > 1e-3
    assert torch.allclose(base(**kw).logits, ref, atol=1e-5)  # no prefix kwargs: plain attention


def test_mlp_runs_once_per_step_not_per_row(tok):
    model = PrefixModel(make_base("llama"), PrefixConfig(num_virtual_tokens=5, projection_hidden=16))
    calls = []
    model.prefix.mlp.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    model(**inputs(tok, "llama", texts=["a", "bb", "ccc", "dddd"]))
    assert calls == [(5, 32)]  # P rows x (kv_heads * head_dim), whatever the batch size


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_left_and_right_padding_match_unpadded(tok, family):
    model = PrefixModel(make_base(family), PrefixConfig(num_virtual_tokens=3, projection_hidden=None))
    texts = ["hello there", "hi"]
    alone = [model(**tok([t], return_tensors="pt")).logits[0] for t in texts]
    for side in ("left", "right"):
        enc = batch(tok, texts, side)
        logits = model(**enc).logits
        for row, ref in enumerate(alone):
            real = enc["attention_mask"][row].bool()
            assert torch.allclose(logits[row][real], ref, atol=1e-5), (side, row)


def test_loss_only_on_target_tokens(tok):
    model = PrefixModel(make_base("llama"), PrefixConfig(num_virtual_tokens=3, projection_hidden=None))
    enc = tok(["abc:def"], return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[:, :4] = -100  # prompt "abc:" ignored
    out = model(**enc, labels=labels)
    logits = out.logits[0, :-1]
    manual = F.cross_entropy(logits[3:], enc["input_ids"][0, 4:])
    assert torch.allclose(out.loss, manual, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bart"])
def test_gradient_checkpointing_gives_same_gradients(tok, family):
    model = PrefixModel(make_base(family), PrefixConfig(num_virtual_tokens=3, projection_hidden=8))
    kw = inputs(tok, family)
    labels = kw.get("decoder_input_ids", kw["input_ids"])
    model(**kw, labels=labels).loss.backward()
    ref = [p.grad.clone() for p in model.prefix.parameters()]
    model.prefix.zero_grad()
    model.gradient_checkpointing_enable()
    model(**kw, labels=labels).loss.backward()
    for p, g in zip(model.prefix.parameters(), ref, strict=True):
        assert p.grad is not None and torch.allclose(p.grad, g, atol=1e-6)
    model.gradient_checkpointing_disable()


def test_bf16_base_trains(tok):
    base = make_base("llama", dtype=torch.bfloat16)
    model = PrefixModel(base, PrefixConfig(num_virtual_tokens=3, projection_hidden=8))
    kw = inputs(tok, "llama")
    out = model(**kw, labels=kw["input_ids"])
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.prefix.parameters())


def test_init_modes(tok):
    base = make_base("llama")
    zero = PrefixModel(base, PrefixConfig(num_virtual_tokens=3, projection_hidden=16, init="zero"))
    assert zero.prefix.fold().abs().max() < 1e-6
    text = "the cat sat on the mat"
    for hidden in (None, 32):
        m = PrefixModel(base, PrefixConfig(num_virtual_tokens=4, projection_hidden=hidden, init="text", init_text=text),
                        tokenizer=tok)
        want = text_table(base, tok, text, 4)
        assert torch.allclose(m.prefix.fold(), want, atol=1e-4)
    with pytest.raises(ValueError, match="tokens"):
        PrefixModel(base, PrefixConfig(num_virtual_tokens=40, init="text", init_text="short"), tokenizer=tok)


def test_config_validation():
    for bad in ({"num_virtual_tokens": 0}, {"projection_hidden": -1}, {"init": "magic"}, {"init": "text"}):
        with pytest.raises(ValueError):
            PrefixConfig(**bad)


def test_unsupported_attention_implementation():
    base = make_base("llama", attn="eager")
    PrefixModel(base, PrefixConfig(num_virtual_tokens=2))  # eager is supported
    base.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="sdpa"):
        PrefixModel(base, PrefixConfig(num_virtual_tokens=2))


def test_model_without_attention_interface_is_refused():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        PrefixModel(t5, PrefixConfig(num_virtual_tokens=2))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eager_matches_sdpa(tok, family):
    kw = inputs(tok, family, side="left")
    outs = []
    for attn in ("sdpa", "eager"):
        model = PrefixModel(make_base(family, attn=attn), PrefixConfig(num_virtual_tokens=3, projection_hidden=None))
        real = kw["attention_mask"].bool()
        outs.append(model(**kw).logits[real])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_sites_with_different_head_layouts(tok, tmp_path):
    """Encoder and decoder with different head counts: per-site shapes differ, all still exact."""
    from transformers import AutoModelForSeq2SeqLM

    from prefix_core import PrefixArtifact
    from support.tiny_models import CONFIGS

    config = CONFIGS["bart"]()
    config.encoder_attention_heads = 2
    base = AutoModelForSeq2SeqLM.from_config(config, attn_implementation="sdpa").eval()
    model = PrefixModel(base, PrefixConfig(num_virtual_tokens=3, projection_hidden=8))
    shapes = {(s.kind, s.kv_heads, s.head_dim) for s in model.geometry.sites}
    assert shapes == {("encoder", 2, 32), ("decoder", 4, 16), ("cross", 4, 16)}
    kw = inputs(tok, "bart")
    want = model(**kw).logits
    art = PrefixArtifact.load(model.export().save(tmp_path / "a"))
    assert torch.allclose(PrefixModel.from_artifact(base, art)(**kw).logits, want, atol=1e-6)


def test_prefix_mask_is_built_once_per_forward(tok):
    from prefix_core.attention import PrefixKV

    model = PrefixModel(make_base("llama"), PrefixConfig(num_virtual_tokens=3))
    builds = []
    original = PrefixKV.extend_mask

    def counting(self, mask, *args):
        before = len(self._mask_cache)
        out = original(self, mask, *args)
        builds.append(len(self._mask_cache) > before)
        return out

    PrefixKV.extend_mask = counting
    try:
        model(**inputs(tok, "llama"))
    finally:
        PrefixKV.extend_mask = original
    assert len(builds) == 2 and builds == [True, False]  # 2 layers, one build
