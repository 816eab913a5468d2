"""PrefixArtifact: round trip, manifest, base checks, corruption, atomic save, PEFT interop."""

import json

import pytest
import torch

from prefix_core import ArtifactError, BaseModelMismatchError, PrefixArtifact, PrefixConfig, PrefixModel
from prefix_core.artifact import PREFIX_FILE, TRAINABLE_FILE
from support.tiny_models import DECODER_ONLY, batch, make_base


def trained_model(family, hidden=8, seed=1):
    model = PrefixModel(make_base(family), PrefixConfig(num_virtual_tokens=4, projection_hidden=hidden, seed=seed))
    with torch.no_grad():
        for p in model.prefix.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def kwargs(tok, family):
    enc = batch(tok, ["hello world", "ab"], "right")
    kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if family == "bart":
        kw["decoder_input_ids"] = batch(tok, ["xy", "z"], "right")["input_ids"]
    return kw


def test_round_trip_same_logits(tmp_path, tok, family):
    model = trained_model(family)
    model.eval()
    kw = kwargs(tok, family)
    want = model(**kw).logits
    path = model.export(prompt_template="T: {source}\nA:", training={"steps": 3}).save(tmp_path / "a")
    art = PrefixArtifact.load(path)
    again = PrefixModel.from_artifact(model.base, art)
    assert torch.allclose(again(**kw).logits, want, atol=1e-6)
    resumed = PrefixModel.from_artifact(model.base, art, trainable=True)
    assert resumed.prefix.uses_mlp and torch.allclose(resumed(**kw).logits, want, atol=1e-6)
    m = art.manifest
    assert m["format_version"] == 1 and m["num_virtual_tokens"] == 4 and m["dtype"] == "float32"
    assert m["prompt_template"] == "T: {source}\nA:" and m["training"] == {"steps": 3}
    assert m["base_model"]["name"] == f"tiny-{family}" and len(m["base_model"]["fingerprint"]) == 32
    assert m["base_model"]["geometry"]["sites"] and m["created_at"]
    keys = {k for k in art.tensors}
    assert "decoder.0.key" in keys and (family != "bart" or {"encoder.1.value", "cross.0.key"} <= keys)


def test_refuses_other_base(tmp_path):
    art = trained_model("llama").export()
    with pytest.raises(BaseModelMismatchError, match="different weights"):
        PrefixModel.from_artifact(make_base("llama", seed=7), art)
    with pytest.raises(BaseModelMismatchError, match="tiny-gpt2"):
        PrefixModel.from_artifact(make_base("gpt2"), art)


def test_bf16_base_accepts_fp32_trained_prefix():
    """A prefix trained on the fp32 base loads onto the same weights in bf16 (the fingerprint ignores dtype) and
    computes what the fp32 model computes, up to bf16 rounding (what `generate --precision bf16` relies on)."""
    fp32 = trained_model("llama")
    art = fp32.export()
    bf16 = PrefixModel.from_artifact(make_base("llama", dtype=torch.bfloat16), art)
    assert bf16.prefix.fold().dtype == torch.float32  # the table stays fp32; attention casts it once per call
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want, got = fp32(input_ids=ids).logits, bf16(input_ids=ids).logits
        bare = make_base("llama")(input_ids=ids).logits
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, atol=0.1, rtol=0.05)
    assert (got.float() - want).abs().max() < (want - bare).abs().max()  # rounding << what the prefix changes


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_corrupt_artifact_is_refused(tmp_path, damage):
    path = trained_model("llama").export().save(tmp_path / "a")
    target = path / PREFIX_FILE
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        (path / TRAINABLE_FILE).unlink()
    else:
        (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError):
        PrefixArtifact.load(path)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        PrefixArtifact.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "prefixflow.prefix", "format_version": 99}))
    with pytest.raises(ArtifactError, match="Upgrade"):
        PrefixArtifact.load(tmp_path)


def test_failed_save_keeps_previous_artifact(tmp_path, monkeypatch):
    first = trained_model("llama", seed=1).export()
    path = first.save(tmp_path / "a")
    second = trained_model("llama", seed=2).export()
    import prefix_core.artifact as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(OSError):
        second.save(path)
    monkeypatch.undo()
    assert torch.equal(PrefixArtifact.load(path).table(), first.table())
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_to_peft_gives_same_logits(tmp_path, tok, family):
    from peft import PeftModel

    model = trained_model(family)
    kw = kwargs(tok, family)
    model.export().to_peft(tmp_path / "peft")
    fresh = make_base(family)  # PEFT on its own copy of the base, plain attention
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "peft"))
    peft_model.eval()
    real = kw["attention_mask"].bool()
    diff = (peft_model(**kw).logits[real] - model(**kw).logits[real]).abs().max()
    assert diff <= 1e-4


def test_from_peft_trained_adapter(tmp_path, tok):
    """A PEFT adapter trained with the MLP (prefix_projection) imports with equal logits."""
    from peft import PrefixTuningConfig, get_peft_model

    peft_model = get_peft_model(make_base("llama"), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16))
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    peft_model.eval()
    kw = kwargs(tok, "llama")
    want = peft_model(**kw).logits
    peft_model.save_pretrained(str(tmp_path / "p"))
    base = make_base("llama")
    art = PrefixArtifact.from_peft(tmp_path / "p", base)
    ours = PrefixModel.from_artifact(base, art)
    real = kw["attention_mask"].bool()
    assert (ours(**kw).logits[real] - want[real]).abs().max() <= 1e-4


def test_peft_export_refused_for_encoder_decoder(tmp_path):
    with pytest.raises(ArtifactError, match="decoder"):
        trained_model("bart").export().to_peft(tmp_path / "p")
