"""DecodeEngine: continuous batching with each row's prefix in its KV cache equals generating each request alone."""

import pytest
import torch

from prefix_core import BaseModelMismatchError, PrefixConfig, PrefixModel, UnsupportedModelError
from prefix_core.attention import PrefixKV
from prefix_core.serving import DecodeEngine, EngineConfig
from support.tiny_models import make_base

EOS = 1
PREFIX_LENGTHS = {"a": 3, "b": 5, "c": 8}


def make_bank(family, attn="sdpa"):
    """A tiny random base and three random folded prefixes of different lengths for it."""
    base = make_base(family, attn=attn)
    arts = {}
    for name, p in PREFIX_LENGTHS.items():
        model = PrefixModel(base, PrefixConfig(num_virtual_tokens=p, projection_hidden=None, seed=p))
        arts[name] = model.export()
    return base, arts


def ids(tok, text):
    return tok(text)["input_ids"]


def alone(model, prompt, max_new_tokens):
    """Greedy tokens of one request generated alone by HF generate (``model``: a PrefixModel or a bare base), cut
    after the first EOS as the engine stops there."""
    inputs = torch.tensor([prompt])
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(EOS) + 1] if EOS in new else new


def reference(base, art, prompt, max_new_tokens):
    return alone(base if art is None else PrefixModel.from_artifact(base, art), prompt, max_new_tokens)


def drive(engine, schedule=None):
    """Step the engine until idle, adding ``schedule[step]`` (a list of ``add`` (args, kwargs)) before the step of
    that index. Checks that a finished row has left the batch at once and that indices count up.
    Returns (tokens per id, finish reason per id, trace of (active ids, pending) after each step)."""
    schedule = schedule or {}
    tokens, reasons, trace, index, step = {}, {}, [], {}, 0
    while engine.has_work or any(s >= step for s in schedule):
        for args, kwargs in schedule.get(step, []):
            engine.add(*args, **kwargs)
        for out in engine.step():
            assert out.request_id not in reasons, "a finished request produced another token"
            tokens.setdefault(out.request_id, []).append(out.token_id)
            assert out.index == index.get(out.request_id, out.index - 1) + 1
            index[out.request_id] = out.index
            if out.finished:
                reasons[out.request_id] = out.finish_reason
                assert out.request_id not in engine.active_ids
        trace.append((list(engine.active_ids), engine.num_pending))
        step += 1
        assert step < 100
    return tokens, reasons, trace


@pytest.mark.parametrize(("family", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"),
                                              ("mistral", "sdpa"), ("gpt2", "sdpa")])
def test_requests_joining_and_leaving_equal_each_alone(tok, family, attn):
    base, arts = make_bank(family, attn)
    engine = DecodeEngine(base, tok, max_batch=4)
    # step -> (request id, prefix name, prompt, max_new_tokens): different prefixes (and none), prompt lengths,
    # join steps and lengths; more requests than rows, so some wait for a row that another one frees.
    plan = {
        0: [("r0", "a", "hello world", 9), ("r1", None, "abc def", 4), ("r2", "c", "xy", 7)],
        2: [("r3", "b", "the quick brown fox", 6), ("r4", "a", "q", 1), ("r5", "c", "what is 22 ?", 8)],
        5: [("r6", None, "zz top", 5), ("r7", "b", "a", 6)],
    }
    schedule = {s: [((rid, ids(tok, text), arts.get(name)), {"max_new_tokens": n}) for rid, name, text, n in reqs]
                for s, reqs in plan.items()}
    tokens, reasons, trace = drive(engine, schedule)
    for reqs in plan.values():
        for rid, name, text, n in reqs:
            want = reference(base, arts.get(name), ids(tok, text), n)
            assert tokens[rid] == want, rid
            assert reasons[rid] == ("eos" if want[-1] == EOS else "length"), rid
            assert reasons[rid] == "eos" or len(want) == n
    assert max(len(active) for active, _ in trace) == 4  # the batch was full ...
    assert max(pending for _, pending in trace) > 0  # ... and requests waited for a row
    prefix_of = {rid: name for reqs in plan.values() for rid, name, _, _ in reqs}
    assert max(len({prefix_of[rid] for rid in active}) for active, _ in trace) == 4  # a, b, c and none at once
    assert engine.num_active == 0 and engine._cache is None


def test_prefix_sits_in_the_cache_once(tok):
    """A row's cache starts with its prefix's keys/values (written at prefill); decode forwards get no prefix."""
    base, arts = make_bank("llama")
    engine = DecodeEngine(base, tok)
    seen = []
    forward = base.forward
    base.forward = lambda *args, **kwargs: seen.append(kwargs) or forward(*args, **kwargs)
    prompt = ids(tok, "hello")
    engine.add("x", prompt, arts["c"], max_new_tokens=5)
    engine.add("y", ids(tok, "abc"), None, max_new_tokens=5)
    keys, values = arts["c"].keys_values()
    for step in range(3):
        engine.step()
        kv = engine.cached_kv("x")
        assert len(kv) == len(keys)
        for layer, (k, v) in enumerate(kv):
            assert k.shape == (2, 8 + len(prompt) + step, 16)
            assert torch.equal(k[:, :8], keys[layer]) and torch.equal(v[:, :8], values[layer])
        assert engine.cached_kv("y")[0][0].shape[1] == 3 + step
    assert len(seen) == 3  # one prefill forward, then one decode forward per step
    assert all(not set(kw) & {"prefix_kv", "prefix_rows"} for kw in seen)
    assert [kw["input_ids"].shape for kw in seen[1:]] == [(2, 1), (2, 1)]
    with pytest.raises(KeyError, match="not running"):
        engine.cached_kv("z")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rows_without_prefix_equal_the_bare_base(tok, family):
    base, arts = make_bank(family)
    bare = make_base(family)  # the same weights, never attached to a prefix
    engine = DecodeEngine(base, tok, max_batch=3)
    # request id -> (join step, prompt, max_new_tokens); a prefixed row runs beside them
    plain = {"n0": (0, "abc", 7), "n1": (1, "hello world, how are you", 5), "n2": (3, "z", 6)}
    schedule = {0: [(("p", ids(tok, "xyz"), arts["c"]), {"max_new_tokens": 6})]}
    for rid, (step, text, n) in plain.items():
        schedule.setdefault(step, []).append(((rid, ids(tok, text)), {"max_new_tokens": n}))
    tokens, _, _ = drive(engine, schedule)
    for rid, (_, text, n) in plain.items():
        assert tokens[rid] == alone(bare, ids(tok, text), n), rid


def test_every_prefix_form_gives_the_same_tokens(tok):
    """Artifact, per-site (keys, values), a [P, W] table, a one-prefix PrefixKV and a PrefixModel, in one batch."""
    base, arts = make_bank("qwen2")
    art = arts["b"]
    model = PrefixModel.from_artifact(base, art)
    kv = model.prefix_kv()
    padded = PrefixKV([torch.cat([k, torch.ones_like(k[:, :, :2])], dim=2) for k in kv.keys],
                      [torch.cat([v, torch.ones_like(v[:, :, :2])], dim=2) for v in kv.values],
                      torch.tensor([[True] * 5 + [False] * 2]))
    forms = {"artifact": art, "kv": art.keys_values(), "table": art.table(), "bank": kv, "padded": padded,
             "model": model}
    engine = DecodeEngine(base, tok)
    prompt = ids(tok, "hello world")
    for name, form in forms.items():
        engine.add(name, prompt, form, max_new_tokens=6)
    tokens = engine.run()
    want = alone(model, prompt, 6)
    assert tokens == dict.fromkeys(forms, want)


def test_cancel_frees_the_row(tok):
    base, arts = make_bank("llama")
    engine = DecodeEngine(base, tok, max_batch=2)
    engine.add("a", ids(tok, "hello world"), arts["a"], max_new_tokens=10)
    engine.add("b", ids(tok, "the quick brown fox"), arts["c"], max_new_tokens=10)
    engine.add("c", ids(tok, "abc"), None, max_new_tokens=5)
    engine.add("d", ids(tok, "xy"), arts["b"], max_new_tokens=5)
    engine.step()
    engine.step()
    assert engine.active_ids == ["a", "b"] and engine.num_pending == 2
    assert engine.cancel("b")
    assert engine.active_ids == ["a"]
    assert engine._cache.layers[0].keys.shape[0] == 1  # its cache row is gone
    assert engine._cache.layers[0].keys.shape[2] == 3 + 11 + 1  # and the columns only b needed are trimmed
    assert not engine.cancel("b") and not engine.cancel("nope")
    assert engine.cancel("d") and engine.num_pending == 1  # a queued request can be cancelled too
    tokens, _, trace = drive(engine)
    assert trace[0] == (["a", "c"], 0)  # c took the freed row at the next step
    assert set(tokens) == {"a", "c"}
    prompt_a = ids(tok, "hello world")
    full_a = reference(base, arts["a"], prompt_a, 10)
    assert tokens["a"] == full_a[2:]  # its first two tokens came out before the drive
    assert tokens["c"] == reference(base, None, ids(tok, "abc"), 5)
    assert engine.num_active == 0


def test_sampling_is_reproducible_per_request(tok):
    base, arts = make_bank("llama")
    prompt = ids(tok, "hello")

    def sample(seed, with_others, global_seed):
        torch.manual_seed(global_seed)  # the request's own generator does not depend on the global RNG
        engine = DecodeEngine(base, tok)
        request = (("s", prompt, arts["b"]), {"max_new_tokens": 10, "temperature": 1.3, "top_p": 0.95, "seed": seed})
        schedule = {0: [request]}
        if with_others:  # join a running batch at step 2, prefilled together with another request
            schedule = {0: [(("g1", ids(tok, "abc"), arts["a"]), {"max_new_tokens": 6, "temperature": 0.7})],
                        2: [request, (("g2", ids(tok, "xyz def"), None), {"max_new_tokens": 4})]}
        return drive(engine, schedule)[0]["s"]

    first = sample(11, False, 0)
    assert len(first) == 10
    assert sample(11, False, 1) == first
    assert sample(11, True, 2) == first
    assert sample(12, False, 0) != first


def test_stop_tokens_and_stop_strings(tok):
    base, arts = make_bank("llama")
    prompt = ids(tok, "hello world")
    want = reference(base, arts["a"], prompt, 8)
    assert len(want) == 8 and EOS not in want
    engine = DecodeEngine(base, tok)
    engine.add("tok", prompt, arts["a"], max_new_tokens=8, stop_token_ids=[want[2]])
    text = tok.decode(want[3:4])
    engine.add("str", prompt, arts["a"], max_new_tokens=8, stop=text)
    tokens, reasons, _ = drive(engine)
    assert tokens["tok"] == want[: want.index(want[2]) + 1] and reasons["tok"] == "stop"
    cut = next(i for i in range(8) if text in tok.decode(want[: i + 1], skip_special_tokens=True))
    assert tokens["str"] == want[: cut + 1] and reasons["str"] == "stop"
    assert cut <= 3


def test_ignore_eos_runs_past_eos_to_max_new_tokens(tok):
    """``ignore_eos`` (load tests): the request runs past an EOS to max_new_tokens, with the same tokens up to it."""
    base, arts = make_bank("llama")
    prompt = ids(tok, "hello world")
    want = reference(base, arts["a"], prompt, 8)
    assert len(want) == 8
    eos = want[2]  # this engine's EOS: the third greedy token
    engine = DecodeEngine(base, tok, eos_token_ids=(eos,))
    engine.add("stops", prompt, arts["a"], max_new_tokens=8)
    engine.add("runs", prompt, arts["a"], max_new_tokens=8, ignore_eos=True)
    tokens, reasons, _ = drive(engine)
    assert tokens["stops"] == want[: want.index(eos) + 1] and reasons["stops"] == "eos"
    assert tokens["runs"] == want and reasons["runs"] == "length"


def test_a_vanishing_temperature_or_top_p_samples_as_greedy(tok):
    """A temperature or top_p so small it rounds to 0 in float32 (Schemathesis sent top_p 5e-324, and the engine
    answered 500: every probability masked) keeps only the top token: the greedy output."""
    base, arts = make_bank("llama")
    prompt = [5, 9, 13]
    engine = DecodeEngine(base, tok)
    engine.add("greedy", prompt, arts["a"], max_new_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add("top_p", prompt, arts["a"], max_new_tokens=6, temperature=1.0, top_p=5e-324, seed=1, ignore_eos=True)
    engine.add("cold", prompt, arts["a"], max_new_tokens=6, temperature=5e-324, seed=1, ignore_eos=True)
    tokens, _, _ = drive(engine)
    assert tokens["top_p"] == tokens["greedy"] and tokens["cold"] == tokens["greedy"]


def test_bad_requests_get_clear_errors(tok):
    base, arts = make_bank("llama")
    engine = DecodeEngine(base, tok)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add("e", [])
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add("e", "")
    with pytest.raises(ValueError, match=r"too long: prefix \(0\) \+ prompt \(600\).*model has 512"):
        engine.add("long", [5] * 600)
    with pytest.raises(ValueError, match=r"too long: prefix \(8\) \+ prompt \(500\) \+ max_new_tokens \(10\)"):
        engine.add("long", [5] * 500, arts["c"], max_new_tokens=10)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 49\)"):
        engine.add("oov", [5, 49])
    with pytest.raises(ValueError, match="top_p"):
        engine.add("s", [5], temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        engine.add("n", [5], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"expected \(2, 3, 16\)"):
        engine.add("kv", [5], ([torch.zeros(1, 3, 16)] * 2, [torch.zeros(1, 3, 16)] * 2))
    with pytest.raises(BaseModelMismatchError):
        engine.add("other", [5], make_bank("qwen2")[1]["a"])
    assert not engine.has_work
    engine.add("edge", [5] * 494, arts["c"], max_new_tokens=10)  # exactly 512 positions: accepted
    with pytest.raises(ValueError, match="already queued or running"):
        engine.add("edge", [5])
    with pytest.raises(ValueError, match="max_batch"):
        EngineConfig(max_batch=0)


def test_longest_request_runs_on_gpt2(tok):
    """GPT-2 indexes a table of 512 positions: a request using all of them runs beside a short one."""
    base, arts = make_bank("gpt2")
    engine = DecodeEngine(base, tok)
    long_prompt = [5, 6, 7] * 164 + [8, 9]  # 494 tokens: 8 + 494 + 10 = 512 positions
    engine.add("long", long_prompt, arts["c"], max_new_tokens=10)
    engine.add("short", ids(tok, "abc"), arts["a"], max_new_tokens=10)
    tokens = engine.run()
    assert tokens["long"] == reference(base, arts["c"], long_prompt, 10)
    assert tokens["short"] == reference(base, arts["a"], ids(tok, "abc"), 10)


def test_encoder_decoder_is_refused(tok):
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        DecodeEngine(make_base("bart"), tok)
