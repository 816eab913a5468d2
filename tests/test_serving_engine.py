"""DecodeEngine: continuous batching of rows with different prefixes (each prefix stored once, each row's tokens in
its own slot, prompts prefilled in chunks) equals generating each request alone."""

import pytest
import torch

from prefix_core import BaseModelMismatchError, PrefixConfig, PrefixModel, UnsupportedModelError
from prefix_core.attention import PrefixKV
from prefix_core.decode_engine import DecodeEngine, EngineConfig
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
    engine = DecodeEngine(base, tok, max_batch=4, prefill_chunk=64)  # whole prompts: the schedule below assumes it
    # step -> (request id, prefix name, prompt, max_new_tokens): different prefixes (and none), prompt lengths,
    # join steps and lengths; more requests than rows, so some wait for a row that another one frees.
    plan = {
        0: [("r0", "a", "hello world", 9), ("r1", None, "abc def", 4), ("r2", "c", "xy", 7)],
        2: [("r3", "b", "the quick brown fox", 9), ("r4", "a", "q", 1), ("r5", "c", "what is 22 ?", 8)],
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
    assert engine.num_active == 0 and engine.pool.in_use == 0


def test_a_prefix_is_stored_once_and_a_decode_step_copies_nothing(tok, monkeypatch):
    """Rows with one prefix share one pool entry (no per-row copy); each row's own tokens sit in its slot; decode
    forwards write one column per row into the same storage and attention reads that storage itself (views)."""
    from prefix_core import slot_attention

    base, arts = make_bank("llama")
    engine = DecodeEngine(base, tok, max_batch=4, prefill_chunk=64)
    seen, reads = [], []
    forward = base.forward
    base.forward = lambda *args, **kwargs: seen.append(kwargs) or forward(*args, **kwargs)
    attend = slot_attention.slot_attention
    monkeypatch.setattr("prefix_core.attention.slot_attention",
                        lambda module, q, k, v, *a: reads.append((k, v)) or attend(module, q, k, v, *a))
    prompt = ids(tok, "hello")
    engine.add("x", prompt, arts["c"], max_new_tokens=5)
    engine.add("y", ids(tok, "abc"), None, max_new_tokens=5)
    engine.add("z", ids(tok, "xy"), arts["c"], max_new_tokens=5)
    keys, values = arts["c"].keys_values()
    engine.step()
    entry = engine.prefix_entry("x")
    assert entry == engine.prefix_entry("z") != 0 and engine.prefix_entry("y") == 0 and engine.pool.in_use == 1
    for layer in range(len(keys)):
        k, v = engine.pool.storage(entry, layer)
        assert torch.equal(k[:, :8], keys[layer]) and torch.equal(v[:, :8], values[layer])
    storage = [(k.data_ptr(), v.data_ptr()) for k, v in zip(engine.cache.keys, engine.cache.values, strict=True)]
    for step in range(1, 3):
        reads.clear()
        before = [kv[0][0].clone() for kv in (engine.cached_kv(r) for r in "xyz")]
        engine.step()
        assert [(k.data_ptr(), v.data_ptr()) for k, v in zip(engine.cache.keys, engine.cache.values,
                                                              strict=True)] == storage
        for rid, old in zip("xyz", before, strict=True):  # one more column, the earlier ones untouched
            k = engine.cached_kv(rid)[0][0]
            assert k.shape[1] == old.shape[1] + 1 and torch.equal(k[:, :-1], old)
        assert engine.cached_kv("x")[0][0].shape == (2, len(prompt) + step, 16)
        assert len(reads) == len(keys)  # one decode forward, one attention call per layer ...
        for layer, (k, v) in enumerate(reads):  # ... reading the slots' storage itself, not a copy of it
            assert k.data_ptr() == storage[layer][0] and v.data_ptr() == storage[layer][1]
    assert len(seen) == 3  # one prefill forward, then one decode forward per step
    assert all(not set(kw) & {"prefix_kv", "prefix_rows"} for kw in seen)
    assert [kw["input_ids"].shape for kw in seen[1:]] == [(3, 1), (3, 1)]
    with pytest.raises(KeyError, match="not running"):
        engine.cached_kv("nope")
    engine.run()
    assert engine.pool.in_use == 0
    engine.add("again", prompt, arts["c"], max_new_tokens=2)
    engine.step()
    assert engine.prefix_entry("again") == entry  # kept while idle: not stored a second time


def test_chunked_prefill_equals_unchunked_and_running_rows_keep_their_pace(tok):
    """A long prompt prefilled 5 tokens a step gives the tokens it gives prefilled at once, and the rows already
    decoding get a token at every step meanwhile; short prompts share the rest of a step's budget."""
    base, arts = make_bank("llama")
    long_prompt = ids(tok, "the quick brown fox jumps over the lazy dog 0123456789")
    requests = {"run": ("abc", arts["a"], 30), "long": (long_prompt, arts["c"], 6), "long2": (long_prompt, None, 4),
                "short": ("xy", arts["b"], 5)}
    engine = DecodeEngine(base, tok, max_batch=4, prefill_chunk=5)
    engine.add("run", ids(tok, "abc"), arts["a"], max_new_tokens=30)
    engine.step()
    for rid in ("long", "long2", "short"):
        prompt, art, n = requests[rid]
        engine.add(rid, prompt if isinstance(prompt, list) else ids(tok, prompt), art, max_new_tokens=n)
    tokens, steps, chunked_kv = {}, 0, None
    while engine.has_work:
        out = engine.step()
        steps += 1
        if "run" in engine.active_ids:
            assert "run" in {o.request_id for o in out}  # never held up by the long prefill
        for o in out:
            tokens.setdefault(o.request_id, []).append(o.token_id)
            if o.request_id == "long" and o.index == 0:
                chunked_kv = [(k.clone(), v.clone()) for k, v in engine.cached_kv("long")]
    assert steps > 2 * len(long_prompt) // 5  # the two long prompts took several steps each
    for rid in ("long", "long2", "short"):
        prompt, art, n = requests[rid]
        prompt = prompt if isinstance(prompt, list) else ids(tok, prompt)
        assert tokens[rid] == reference(base, art, prompt, n), rid
    whole = DecodeEngine(base, tok, max_batch=4, prefill_chunk=len(long_prompt))
    whole.add("long", long_prompt, arts["c"], max_new_tokens=6)
    whole.step()
    for (k, v), (k_chunked, v_chunked) in zip(whole.cached_kv("long"), chunked_kv, strict=True):
        assert k.shape[1] == len(long_prompt)  # the prompt's keys/values: the same whether chunked or not
        torch.testing.assert_close(k_chunked, k, rtol=0, atol=1e-5)
        torch.testing.assert_close(v_chunked, v, rtol=0, atol=1e-5)
    assert whole.run()["long"] == tokens["long"][1:]
    assert DecodeEngine(base, tok, max_batch=3).prefill_chunk == 6  # the CPU default: 2 x max_batch


def test_the_kv_memory_bounds_a_row_and_grows_between_steps(tok):
    base, arts = make_bank("llama")
    per_token = 2 * 2 * 2 * 16 * 4  # keys + values, 2 layers, 2 KV heads of 16, float32
    engine = DecodeEngine(base, tok, max_batch=2, kv_cache_mb=600 * 2 * per_token / 2**20)
    assert engine.max_columns == 512  # 600 columns fit, the model has 512 positions
    small = DecodeEngine(base, tok, max_batch=2, kv_cache_mb=300 * 2 * per_token / 2**20)
    assert small.max_columns == 300
    with pytest.raises(ValueError, match=r"too long for the KV memory: prompt \(295\) \+ max_new_tokens \(10\)"
                                         r".*holds 300.*kv-cache-mb"):
        small.add("big", [5] * 295, max_new_tokens=10)
    assert small.cache.columns == 256
    small.add("fits", [5] * 290, arts["a"], max_new_tokens=10)
    small.step()
    assert small.cache.columns == 300  # grown (doubling, capped by the budget) when the row was admitted
    with pytest.raises(ValueError, match="kv_cache_mb"):
        DecodeEngine(base, tok, max_batch=2, kv_cache_mb=1e-6)


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
    engine = DecodeEngine(base, tok, max_batch=2, prefill_chunk=64)
    engine.add("a", ids(tok, "hello world"), arts["a"], max_new_tokens=10)
    engine.add("b", ids(tok, "the quick brown fox"), arts["c"], max_new_tokens=10)
    engine.add("c", ids(tok, "abc"), None, max_new_tokens=5)
    engine.add("d", ids(tok, "xy"), arts["b"], max_new_tokens=5)
    engine.step()
    engine.step()
    assert engine.active_ids == ["a", "b"] and engine.num_pending == 2
    assert engine.cancel("b")
    assert engine.active_ids == ["a"]
    assert engine.scheduler.slots[1] is None  # its slot is free
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


def test_logprobs_equal_the_log_softmax_of_a_plain_forward(tok):
    """Each token's log-probability and its top alternatives, for a prefixed and a bare row decoding together, equal
    the log-softmax of one plain forward over prompt + generated tokens (fp32, within 1e-4)."""
    base, arts = make_bank("llama")
    prompt, bare_prompt = ids(tok, "hello world"), ids(tok, "abc")
    engine = DecodeEngine(base, tok, max_batch=3, prefill_chunk=4)  # chunked prefill on the way
    engine.add("p", prompt, arts["b"], max_new_tokens=6, logprobs=3, ignore_eos=True)
    engine.add("bare", bare_prompt, None, max_new_tokens=5, logprobs=0, ignore_eos=True)
    engine.add("none", prompt, arts["a"], max_new_tokens=4, ignore_eos=True)
    outs: dict = {}
    while engine.has_work:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert all(o.logprob is None and o.top_logprobs == () for o in outs["none"])
    model = PrefixModel.from_artifact(base, arts["b"])
    for rid, forward, start, k in (("p", model, prompt, 3), ("bare", base, bare_prompt, 0)):
        sequence = torch.tensor([start + [o.token_id for o in outs[rid]]])
        with torch.no_grad():
            logits = forward(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[0].float()
        want = torch.log_softmax(logits, dim=-1)[len(start) - 1 :]
        for j, o in enumerate(outs[rid]):
            assert abs(o.logprob - float(want[j, o.token_id])) < 1e-4, (rid, j)
            assert [t for t, _ in o.top_logprobs] == want[j].topk(k).indices.tolist()
            assert all(abs(v - float(want[j, t])) < 1e-4 for t, v in o.top_logprobs)
    with pytest.raises(ValueError, match="logprobs must be >= 0"):
        engine.add("bad", prompt, logprobs=-1)


def test_a_preempted_request_goes_on_where_it_stopped(tok):
    """Preempting frees the row's slot at once; added again, the request is prefilled anew (prompt and the tokens it
    had) and its tokens go on as if nothing happened: greedy equal to alone, sampled equal to not preempted."""
    base, arts = make_bank("llama")
    prompt = ids(tok, "hello world")
    want = reference(base, arts["c"], prompt, 12)
    engine = DecodeEngine(base, tok, max_batch=2, prefill_chunk=6)
    sampled = {"max_new_tokens": 12, "temperature": 1.1, "seed": 3, "ignore_eos": True}
    engine.add("g", prompt, arts["c"], max_new_tokens=12)
    engine.add("s", prompt, arts["a"], **sampled)
    tokens: dict = {}

    def collect(outs):
        for o in outs:
            assert o.index == len(tokens.get(o.request_id, []))  # indices go on across the preemption
            tokens.setdefault(o.request_id, []).append(o.token_id)

    for _ in range(5):
        collect(engine.step())
    assert engine.preempt("g") and engine.preempt("s") and not engine.preempt("g") and not engine.preempt("nope")
    assert engine.num_active == 0 and engine.pool.in_use == 0 and not engine.has_work
    engine.add("other", ids(tok, "abc"), arts["b"], max_new_tokens=3)  # takes a slot meanwhile
    collect(engine.step())
    engine.add("g", [])  # queued again: the arguments are not read
    engine.add("s", [])
    while engine.has_work:
        collect(engine.step())
    assert tokens["g"] == want
    alone = DecodeEngine(base, tok, max_batch=2)
    alone.add("s", prompt, arts["a"], **sampled)
    assert tokens["s"] == alone.run()["s"]
    engine.add("x", prompt, max_new_tokens=5)
    engine.step()
    assert engine.preempt("x") and engine.cancel("x") and not engine.cancel("x")
