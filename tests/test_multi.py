"""MultiPrefixGenerator: rows with different prefixes in one batch behave like each prefix alone."""

import pytest
import torch

from prefix_core import MultiPrefixGenerator, PrefixConfig, PrefixModel
from support.tiny_models import make_base

PROMPTS = {"a": "hello world", "b": "xy", "c": "the quick fox", None: "abc def"}


def bank(family):
    base = make_base(family)
    arts = {}
    for name, p in (("a", 3), ("b", 5), ("c", 8)):
        m = PrefixModel(base, PrefixConfig(num_virtual_tokens=p, projection_hidden=None, seed=p))
        arts[name] = m.export()
    return base, arts


def alone_model(base, arts, name):
    if name is None:
        return None
    return PrefixModel.from_artifact(base, arts[name])


@pytest.mark.parametrize("family", ["llama", "gpt2", "bart"])
def test_mixed_rows_equal_each_prefix_alone(tok, family):
    base, arts = bank(family)
    gen = MultiPrefixGenerator(base, tok, arts)
    requests = list(PROMPTS.items())
    extra = {}
    if family == "bart":
        extra["decoder_input_ids"] = torch.tensor([[2, 5, 6, 7]] * len(requests))
    out, mask = gen.forward(requests, **extra)
    for row, (name, prompt) in enumerate(requests):
        enc = tok([prompt], return_tensors="pt")
        single = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if family == "bart":
            single["decoder_input_ids"] = extra["decoder_input_ids"][:1]
        model = alone_model(base, arts, name)
        ref = (model(**single) if model else base(**single)).logits[0]
        got = out.logits[row] if family == "bart" else out.logits[row][mask[row].bool()]
        assert (got - ref).abs().max() <= 1e-5, name


@pytest.mark.parametrize("family", ["llama", "gpt2", "bart"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_mixed_generation_equals_alone(tok, family, mode):
    base, arts = bank(family)
    gen = MultiPrefixGenerator(base, tok, arts)
    kw = {"do_sample": False, "min_new_tokens": 5}
    if mode == "beam":
        kw["num_beams"] = 3
    mixed = gen.generate(list(PROMPTS.items()), max_new_tokens=5, **kw)
    for (name, prompt), text in zip(PROMPTS.items(), mixed, strict=True):
        single = MultiPrefixGenerator(base, tok, {name: arts[name]} if name else {})
        assert single.generate([(name, prompt)], max_new_tokens=5, **kw) == [text]
        model = alone_model(base, arts, name)
        if model is not None and mode == "greedy":
            enc = tok([prompt], return_tensors="pt")
            ids = model.generate(**enc, max_new_tokens=5, pad_token_id=0, **kw)
            new = ids[0, 1:] if family == "bart" else ids[0, enc["input_ids"].shape[1]:]
            assert tok.decode(new, skip_special_tokens=True) == text


def test_sampling_is_seeded(tok):
    base, arts = bank("llama")
    gen = MultiPrefixGenerator(base, tok, arts)
    torch.manual_seed(0)
    a = gen.generate(list(PROMPTS.items()), max_new_tokens=6, do_sample=True, temperature=1.0)
    torch.manual_seed(0)
    assert gen.generate(list(PROMPTS.items()), max_new_tokens=6, do_sample=True, temperature=1.0) == a


def test_bank_is_built_once(tok):
    base, arts = bank("llama")
    gen = MultiPrefixGenerator(base, tok, arts)
    before = gen.bank
    gen.generate([("a", "x"), ("b", "y")], max_new_tokens=2)
    assert gen.bank is before and gen.bank.keys[0].shape == (4, 2, 8, 16)


def test_templates_and_unknown_prefix(tok):
    base = make_base("llama")
    art = PrefixModel(base, PrefixConfig(num_virtual_tokens=2)).export(prompt_template="Q: {source}\nA:")
    gen = MultiPrefixGenerator(base, tok, {"qa": art})
    assert gen.render("qa", "hi") == "Q: hi\nA:"
    with pytest.raises(KeyError, match="unknown prefix"):
        gen.generate([("nope", "x")])
