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


@pytest.mark.parametrize("family", ["llama", "gpt2", "bart"])
def test_beam_search_without_a_prefix_equals_hf_generate_on_the_bare_model(tok, family):
    """The evaluation's beam search (num_beams, length_penalty, no_repeat_ngram_size) on the ``None`` prefix is
    exactly transformers' beam search on the bare model."""
    from prefixflow.services.spec import EvaluateSpec

    decoding = EvaluateSpec(num_beams=4, length_penalty=0.8, no_repeat_ngram_size=3).decoding()
    assert decoding == {"num_beams": 4, "length_penalty": 0.8, "early_stopping": True, "no_repeat_ngram_size": 3}
    prompts = ["red cat", "blue sun moon", "x"]
    base, arts = bank(family)
    got = MultiPrefixGenerator(base, tok, arts).generate([(None, p) for p in prompts], max_new_tokens=12,
                                                         do_sample=False, **decoding)
    bare = make_base(family)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="right" if family == "bart" else "left")
    out = bare.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, **decoding)
    if family != "bart":
        out = out[:, enc["input_ids"].shape[1]:]
    assert got == tok.batch_decode(out, skip_special_tokens=True)
    assert EvaluateSpec().decoding() == {}  # greedy unless asked


def test_evaluation_decodes_every_system_the_same_way(tok):
    from prefixflow.services.evaluation import generate_all

    base, arts = bank("llama")
    sources = ["red cat", "dog"]
    beams = {"num_beams": 3, "early_stopping": True}
    both = generate_all(base, tok, {"candidate": arts["a"], "champion": arts["b"]}, "in {source}:", sources, 6, 8,
                        False, beams)
    gen = MultiPrefixGenerator(base, tok, {"candidate": arts["a"], "champion": arts["b"]})
    for system, name in (("candidate", "candidate"), ("champion", "champion"), ("baseline", None)):
        prompts = [gen.render(name, s) if name else f"in {s}:" for s in sources]  # each prefix's own template
        want = [gen.generate([(name, p)], max_new_tokens=8, do_sample=False, **beams)[0].strip() for p in prompts]
        assert both[system] == want, system


def test_single_line_answers_stop_at_the_first_newline(tok):
    """Greedy decoding that stops at a newline token gives each row the answer it would have cut from an
    unstopped decoding: the text before its first newline."""
    from prefixflow.services.evaluation import generate_all, newline_stop_ids

    base, arts = bank("llama")
    newline = tok.convert_tokens_to_ids("\n")
    assert newline in newline_stop_ids(tok) and tok.eos_token_id in newline_stop_ids(tok)
    sources = [f"{w} cat" for w in ("red", "dog", "a", "bb", "zz", "q q", "x", "hello")]
    got = generate_all(base, tok, {"candidate": arts["a"]}, "in {source}:", sources, 4, 24, True)
    gen = MultiPrefixGenerator(base, tok, {"candidate": arts["a"]})
    cut = 0
    for system, name in (("candidate", "candidate"), ("baseline", None)):
        prompts = [gen.render(name, s) if name else f"in {s}:" for s in sources]
        full = [gen.generate([(name, p)], max_new_tokens=24, do_sample=False)[0] for p in prompts]
        cut += sum("\n" in text for text in full)
        assert got[system] == [text.split("\n", 1)[0].strip() for text in full], system
    assert cut, "no generation reached a newline: the test would not test the stop"
