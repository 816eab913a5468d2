"""`prefixflow serve` as a real process on 127.0.0.1, called with the official `openai` client (and httpx/curl-like
raw requests where the client hides the wire): completions, chat, streaming, isolation by key, alias moves without
a restart, mixed-prefix batches equal to each prefix alone, overload, disconnects, bad requests, and MLflow's
pyfunc flavour of a registered version. A tiny random llama; prefixes registered in an embedded MLflow store."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from support.harness import wait_until
from support.pipeline import patched_environ
from support.serving import TEMPLATE, register_random_prefix, serve_process, served_model_dir

MAX_BATCH = 4


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory):
    """An embedded MLflow registry with acme/rev v1 (@champion) and v2 (no alias), globex/rev v1 (@champion),
    and acme/other v1 (@champion), a prefix trained on another base (same shape, other weights)."""
    root = tmp_path_factory.mktemp("serve")
    home = root / "home"
    env = {"PREFIXFLOW_HOME": str(home)}
    with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):
        model = served_model_dir(root / "model")
        other = root / "other-model"
        from support.tiny_models import char_tokenizer, make_base

        make_base("llama", seed=7).save_pretrained(other)
        char_tokenizer().save_pretrained(other)
        versions = {
            "acme-v1": register_random_prefix(model, "acme", "rev", seed=1),
            "acme-v2": register_random_prefix(model, "acme", "rev", seed=2, alias=None),
            "globex": register_random_prefix(model, "globex", "rev", seed=3),
            "other-base": register_random_prefix(other, "acme", "other", seed=4),
        }
        yield {"root": root, "env": env, "model": model, "versions": versions}


@pytest.fixture(scope="module")
def keys(registry_home):
    """A keys file with one key per client and an admin key: ``{client: key}``."""
    file = registry_home["root"] / "keys.yaml"
    out = {}
    for client in ("acme", "globex", "*"):
        res = subprocess.run([sys.executable, "-m", "prefixflow.cli", "keys", "add", "--client", client,
                              "--file", str(file)], capture_output=True, text=True, check=True)
        out[client] = res.stdout.strip().splitlines()[-1]
    return {"file": file, **out}


@pytest.fixture(scope="module")
def server(registry_home, keys):
    with patched_environ(registry_home["env"], unset=("MLFLOW_TRACKING_URI",)), \
            serve_process(registry_home["model"], registry_home["env"], "--keys", str(keys["file"]), "--refresh", "1",
                          "--max-batch", str(MAX_BATCH), "--max-tokens", "400") as url:
        yield url


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(registry_home):
    """Greedy generation of one request alone, in this process (no server): ``ref(version or None, prompt, n)``."""
    from transformers import AutoTokenizer

    from prefix_core import DecodeEngine, load_base_model
    from prefix_core.template import render
    from prefixflow.services import registry

    base, _ = load_base_model(str(registry_home["model"]))
    tok = AutoTokenizer.from_pretrained(registry_home["model"])
    arts = {}

    def ref(ref_name: str | None, prompt: str, max_tokens: int) -> str:
        engine = DecodeEngine(base, tok, max_batch=1)
        art = None
        if ref_name is not None:
            with patched_environ(registry_home["env"], unset=("MLFLOW_TRACKING_URI",)):
                if ref_name not in arts:
                    arts[ref_name] = registry.load_version(registry.resolve(ref_name))
            art = arts[ref_name]
        text = render(TEMPLATE, prompt) if art is not None else prompt
        engine.add(0, text, art, max_new_tokens=max_tokens)
        return tok.decode(engine.run()[0], skip_special_tokens=True)

    return ref


def test_completion_chat_and_stream_with_the_openai_client(server, keys, reference):
    c = client(server, keys["acme"])
    r = c.completions.create(model="acme/rev@champion", prompt="red cat", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.model == "acme/rev@champion"
    assert r.choices[0].text == reference("acme/rev/1", "red cat", 10)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens == len("in: red cat\nout:")

    streamed = c.completions.create(model="acme/rev@champion", prompt="red cat", max_tokens=10, temperature=0,
                                    stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason

    chat = c.chat.completions.create(model="acme/rev@champion", messages=[{"role": "user", "content": "blue sun"}],
                                     max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    parts = list(c.chat.completions.create(model="acme/rev@champion", max_tokens=8, temperature=0, stream=True,
                                           messages=[{"role": "user", "content": "blue sun"}]))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content

    # n choices with a seed: reproducible; stop sequences are cut off as OpenAI does
    a = c.completions.create(model="base", prompt="dog", max_tokens=12, temperature=1.0, n=3, seed=5)
    b = c.completions.create(model="base", prompt="dog", max_tokens=12, temperature=1.0, n=3, seed=5)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 3
    # vLLM's ignore_eos (extra_body): max_tokens tokens whatever the text, the same text up to where it ended
    long = c.completions.create(model="acme/rev@champion", prompt="red cat", max_tokens=30, temperature=0,
                                extra_body={"ignore_eos": True})
    short = c.completions.create(model="acme/rev@champion", prompt="red cat", max_tokens=30, temperature=0)
    assert long.usage.completion_tokens == 30 and long.choices[0].finish_reason == "length"
    assert long.choices[0].text.startswith(short.choices[0].text)
    full = c.completions.create(model="base", prompt="tree", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    cut = c.completions.create(model="base", prompt="tree", max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_logprobs_with_the_openai_client(server, keys):
    """Completions' ``logprobs`` and chat's ``logprobs``/``top_logprobs``, whole and streamed, in OpenAI's shapes:
    one entry per generated token, the tokens' texts adding up to the answer, the chosen token's log-probability
    the highest of the alternatives (greedy)."""
    c = client(server, keys["acme"])
    r = c.completions.create(model="acme/rev@champion", prompt="red cat", max_tokens=8, temperature=0, logprobs=2,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    for i, (value, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs, strict=True)):
        assert lp.text_offset[i] == len("".join(lp.tokens[:i]))
        assert value <= 0 and len(top) == 2 and max(top.values()) == pytest.approx(value, abs=1e-5)  # greedy: the top
    streamed = list(c.completions.create(model="acme/rev@champion", prompt="red cat", max_tokens=8, temperature=0,
                                         logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    values = [v for ch in streamed if ch.choices and ch.choices[0].logprobs
              for v in ch.choices[0].logprobs.token_logprobs]
    assert values == pytest.approx(lp.token_logprobs, abs=1e-6)

    chat = c.chat.completions.create(model="acme/rev@champion", messages=[{"role": "user", "content": "blue sun"}],
                                     max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                                     extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and bytes(t.bytes).decode() == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
    plain = c.chat.completions.create(model="acme/rev@champion", messages=[{"role": "user", "content": "blue sun"}],
                                      max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None
    r = httpx.post(f"{server}/v1/chat/completions", headers={"Authorization": f"Bearer {keys['acme']}"}, timeout=30,
                   json={"model": "base", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    assert r.status_code == 400 and "top_logprobs needs logprobs: true" in r.json()["error"]["message"]


def test_the_registry_is_listed_page_by_page(registry_home, monkeypatch):
    """The bank's refresh and /v1/models read every registered model, a page per call (not only the first page)."""
    from prefixflow.services import registry

    with patched_environ(registry_home["env"], unset=("MLFLOW_TRACKING_URI",)):
        whole = sorted(m.name for m in registry.all_models())
        monkeypatch.setattr(registry, "PAGE", 1)
        assert sorted(m.name for m in registry.all_models()) == whole == ["acme-other", "acme-rev", "globex-rev"]
        assert [m.name for m in registry.models("acme")] == ["acme-other", "acme-rev"]


def test_mixed_prefix_batches_equal_each_prefix_alone_under_concurrent_load(server, keys, reference):
    c = client(server, keys["*"])
    jobs = [(model, prompt, tokens) for model, prompt, tokens in [
        ("acme/rev@champion", "red cat dog", 20), ("acme/rev/2", "sun", 7), ("globex/rev@champion", "moon tree", 15),
        ("base", "blue", 11), ("acme/rev/2", "green green red", 18), ("globex/rev/1", "cat", 5),
        ("acme/rev/1", "tree sun moon dog", 12), ("base", "red", 16), ("globex/rev@champion", "dog", 9),
        ("acme/rev@champion", "moon", 14), ("acme/rev/2", "cat sun", 10), ("base", "green tree", 6),
    ]]

    def call(job):
        model, prompt, tokens = job
        return c.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(call, jobs))
    refs = {"acme/rev@champion": "acme/rev/1", "globex/rev@champion": "globex/rev/1", "base": None}
    want = [reference(refs.get(m, m), p, n) for m, p, n in jobs]
    assert got == want
    assert len(set(got)) > 6  # the prefixes really change the output
    metrics = httpx.get(f"{server}/metrics").text
    sizes = _histogram(metrics, "prefixflow_batch_size")
    assert sizes[f"{MAX_BATCH}.0"] > sizes["1.0"]  # some steps decoded several prefixes together


def test_a_key_uses_and_lists_only_its_clients_prefixes(server, keys):
    acme = client(server, keys["acme"])
    with pytest.raises(openai.PermissionDeniedError) as err:
        acme.completions.create(model="globex/rev@champion", prompt="red", max_tokens=2)
    assert err.value.status_code == 403 and "acme" in err.value.body["message"]
    with pytest.raises(openai.PermissionDeniedError):
        acme.completions.create(model="models:/globex-rev/1", prompt="red", max_tokens=2)
    ids = {m.id for m in acme.models.list()}
    assert ids == {"base", "acme/rev@champion", "acme/other@champion"}
    assert {"globex/rev@champion", *ids} <= {m.id for m in client(server, keys["*"]).models.list()}
    assert client(server, keys["globex"]).completions.create(model="globex/rev@champion", prompt="red",
                                                             max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        client(server, "pf-not-a-key").models.list()
    r = httpx.post(f"{server}/v1/completions", json={"model": "base", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_an_alias_moved_by_promote_is_served_without_a_restart(server, keys, registry_home, reference):
    c = client(server, keys["acme"])
    before = c.completions.create(model="acme/rev@champion", prompt="dog sun", max_tokens=10, temperature=0)
    assert before.choices[0].text == reference("acme/rev/1", "dog sun", 10)
    env = {**registry_home["env"]}
    with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):
        subprocess.run([sys.executable, "-m", "prefixflow.cli", "promote", "acme/rev/2"], check=True,
                       capture_output=True)
    want = reference("acme/rev/2", "dog sun", 10)
    assert want != before.choices[0].text
    seen = []

    def moved() -> bool:
        seen.append(c.completions.create(model="acme/rev@champion", prompt="dog sun", max_tokens=10,
                                         temperature=0).choices[0].text)
        return seen[-1] == want

    wait_until(moved, 30, 0.5, message=lambda: f"@champion still answers {seen[-1]!r}, not v2's {want!r}")
    assert "alias_move" in httpx.get(f"{server}/metrics").text
    with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):  # back, for the other tests
        subprocess.run([sys.executable, "-m", "prefixflow.cli", "promote", "acme/rev/1"], check=True,
                       capture_output=True)


def test_a_canary_takes_its_share_of_champion_requests_until_it_is_rolled_back(server, keys, registry_home,
                                                                              reference):
    """promote --canary 25: every replica sends about a quarter of the requests naming @champion to v2 (sticky per
    OpenAI user; 400 distinct users here); rollback ends the canary and every request is v1's again."""
    from concurrent.futures import ThreadPoolExecutor

    c = client(server, keys["acme"])
    answers = {reference(f"acme/rev/{v}", "dog sun", 6): v for v in ("1", "2")}
    assert len(answers) == 2

    def versions(users: list[str]) -> list[str]:
        def ask(user: str) -> str:
            text = c.completions.create(model="acme/rev@champion", prompt="dog sun", max_tokens=6, temperature=0,
                                        user=user).choices[0].text
            return answers[text]
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(ask, users))

    env = {**registry_home["env"]}
    with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):
        subprocess.run([sys.executable, "-m", "prefixflow.cli", "promote", "acme/rev/2", "--canary", "25"],
                       check=True, capture_output=True)
    try:
        probe = [f"probe-{i}" for i in range(40)]
        wait_until(lambda: "2" in versions(probe), 30, 0.5, message="no request went to the canary")
        served = versions([f"user-{i}" for i in range(400)])
        assert abs(served.count("2") / 4 - 25) <= 5, served.count("2")
        assert versions(["user-1"] * 5) == [served[1]] * 5  # sticky
        metrics = httpx.get(f"{server}/metrics").text
        assert 'prefixflow_canary_requests_total{model="acme-rev",role="canary",status="200",version="2"}' in metrics
        with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):
            status = subprocess.run([sys.executable, "-m", "prefixflow.cli", "canary", "status", "acme/rev",
                                     "--server", server], capture_output=True, text=True)
        assert status.returncode == 0, status.stderr
        assert "@canary v2 takes 25% of the requests naming @champion (v1)" in status.stdout
        cells = (line.replace("│", " ").split() for line in status.stdout.splitlines())
        rows = {c[0]: c for c in cells if c and c[0] in ("v1", "v2")}  # version role requests 5xx rate ...
        assert rows["v2"][1] == "canary" and int(rows["v2"][2]) >= served.count("2") and rows["v2"][4] == "0.0%"
        assert rows["v1"][1] == "champion" and int(rows["v1"][2]) >= served.count("1")
    finally:
        with patched_environ(env, unset=("MLFLOW_TRACKING_URI",)):
            res = subprocess.run([sys.executable, "-m", "prefixflow.cli", "rollback", "acme/rev"],
                                 capture_output=True, text=True)
    assert res.returncode == 0 and "canary v2 ended; @champion stays v1" in res.stdout, res.stderr
    wait_until(lambda: set(versions(probe)) == {"1"}, 30, 0.5, message="the canary still gets requests")
    assert "prefixflow_canary_requests_total{" not in httpx.get(f"{server}/metrics").text  # ended: series gone


@pytest.mark.parametrize("body, status, words", [
    ({"model": "base", "prompt": "x", "max_tokens": 5, "temprature": 0}, 400, "unrecognized request argument"),
    ({"model": "base", "prompt": "x", "temperature": 7}, 400, "temperature"),
    ({"model": "base", "prompt": "x", "max_tokens": 401}, 400, "limit of 400"),
    ({"model": "base", "prompt": "x" * 600, "max_tokens": 5}, 400, "too long"),
    ({"model": "base"}, 400, "missing required argument 'prompt'"),
    ({}, 400, "missing required arguments 'model' and 'prompt'"),
    (None, 400, "the request has no body"),
    ({"model": "acme/rev@nope", "prompt": "x"}, 404, "no alias @nope"),
    ({"model": "acme/zzz@champion", "prompt": "x"}, 404, "no registered model"),
    ({"model": "not a model!", "prompt": "x"}, 400, "not a registry reference"),
    ({"model": "acme/other@champion", "prompt": "x"}, 400, "trained on"),
    ({"model": "base", "prompt": "x", "echo": True}, 400, "echo is not supported"),
    ({"model": "base", "prompt": [], "max_tokens": 5}, 400, "prompt is empty"),
    ({"model": "base", "prompt": [999999], "max_tokens": 5}, 400, "token ids"),
])
def test_bad_requests_get_one_clear_error(server, keys, body, status, words):
    r = httpx.post(f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {keys['acme']}"},
                   timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and "Traceback" not in r.text
    assert set(err) == {"message", "type", "param", "code"}


def test_a_client_that_disconnects_frees_its_row(server, keys):
    headers = {"Authorization": f"Bearer {keys['*']}"}
    # the most tokens the server allows, past EOS: it cannot end before the client has gone
    body = {"model": "base", "prompt": "red", "max_tokens": 400, "stream": True, "temperature": 0, "ignore_eos": True}
    metrics = httpx.get(f"{server}/metrics").text
    before, work = _counter(metrics, "prefixflow_requests_cancelled_total"), _row_steps(metrics)
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers, timeout=30) as r:
        next(r.iter_lines())  # the first event: generation has started
    # the engine thread frees the rows before its next step: wait for that, then check it stopped them early
    metrics = _metrics_when(server, lambda m: _counter(m, "prefixflow_requests_cancelled_total") > before
                            and _idle(m), "the cancelled stream still holds a row")
    assert _counter(metrics, "prefixflow_requests_cancelled_total") == before + 1
    assert _row_steps(metrics) - work < 400 / 2  # left long before its 400 tokens
    # a plain (non-streaming) request whose client gives up frees its rows too (16 choices of 400 tokens: more work
    # than the tiny model can do before the server sees the client gone)
    work = _row_steps(metrics)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/completions", json={**body, "stream": False, "n": 16}, headers=headers, timeout=0.2)
    metrics = _metrics_when(server, lambda m: _counter(m, "prefixflow_requests_cancelled_total") > before + 1
                            and _idle(m), "the cancelled request still holds rows")
    assert _counter(metrics, "prefixflow_requests_cancelled_total") == before + 2
    assert _row_steps(metrics) - work < 16 * 400 / 2  # stopped well before its 16 x 400 tokens
    assert client(server, keys["*"]).completions.create(model="base", prompt="red", max_tokens=3).choices


@pytest.mark.slow
def test_the_openapi_document_tells_the_truth(server, keys, tmp_path):
    """Schemathesis (its CLI, as a user runs it) sends requests generated from /openapi.json, valid and invalid,
    with a client's key: no server error, and no status, content type or header the document does not list."""
    doc = httpx.get(f"{server}/openapi.json").json()
    statuses = {status for item in doc["paths"].values() for op in item.values() for status in op["responses"]}
    assert "422" not in statuses and "HTTPValidationError" not in doc["components"]["schemas"]
    answers = set(doc["paths"]["/v1/completions"]["post"]["responses"])
    assert answers == {"200", "400", "401", "403", "404", "429", "500", "503"}
    run = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", f"{server}/openapi.json",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                     "response_headers_conformance",
         "--max-examples", "100", "--seed", "1", "--workers", "1", "--request-timeout", "120", "--no-color",
         "--phases", "examples,coverage,fuzzing", "-H", f"Authorization: Bearer {keys['acme']}"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its .schemathesis/ cache lands there
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    print(run.stdout[-1500:])  # its summary: operations, test cases, checks (pytest -rP)


def test_overload_gets_429_and_every_admitted_request_is_answered(registry_home, keys):
    with serve_process(registry_home["model"], registry_home["env"], "--max-batch", "1", "--max-queued", "2",
                       "--refresh", "0") as url:
        c = client(url, "open")

        def call(i):
            try:
                r = c.completions.create(model="base", prompt="red cat", max_tokens=40, temperature=0)
                return "ok", r.choices[0].finish_reason, r.usage.completion_tokens
            except openai.RateLimitError as err:
                return "429", err.response.headers.get("retry-after"), err.body["message"]

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(call, range(10)))
        ok = [r for r in results if r[0] == "ok"]
        refused = [r for r in results if r[0] == "429"]
        assert ok and refused and len(ok) + len(refused) == 10
        assert all(r[1] in ("length", "stop") for r in ok)
        assert all(int(r[1]) >= 1 and "at capacity" in r[2] for r in refused)
        metrics = httpx.get(f"{url}/metrics").text
        assert _counter(metrics, 'prefixflow_requests_total{endpoint="/v1/completions",status="200"}') == len(ok)
        assert _counter(metrics, 'prefixflow_requests_rejected_total{reason="overloaded"}') == len(refused)
    with serve_process(registry_home["model"], registry_home["env"], "--rate-limit", "1", "--refresh", "0",
                       "--keys", str(keys["file"])) as url:
        c = client(url, keys["acme"])
        codes = []
        for _ in range(3):
            try:
                c.completions.create(model="base", prompt="red", max_tokens=1)
                codes.append(200)
            except openai.RateLimitError as err:
                codes.append(429)
                assert "rate limit of 1 requests per second" in err.body["message"]
        assert codes[0] == 200 and 429 in codes
        assert client(url, keys["globex"]).completions.create(model="base", prompt="red", max_tokens=1).choices


def test_a_flooding_client_does_not_hold_up_another_and_its_own_limit_answers_429(registry_home, keys):
    """Fair shares (serving.fair_queue) through the real server: with 2 batch rows, acme keeps 10 requests in
    flight and globex sends one request at a time. Each of globex's requests gets a row at once (one of acme's
    rows is preempted for it): at most one acme request (finishing meanwhile) ends before its first token, where
    first come, first served would put it behind all of acme's. Past ``--client-max-queued``, acme's requests get
    429 naming acme's limit, while globex is still served."""
    finished: list[float] = []
    with serve_process(registry_home["model"], registry_home["env"], "--keys", str(keys["file"]), "--max-batch", "2",
                       "--client-max-queued", "8", "--refresh", "0") as url:
        acme, globex = client(url, keys["acme"]), client(url, keys["globex"])

        def flood(_):
            try:
                acme.completions.create(model="base", prompt="red cat", max_tokens=200, temperature=0,
                                        extra_body={"ignore_eos": True})
            except openai.RateLimitError as err:
                return err.body["message"]
            finished.append(time.monotonic())
            return "ok"

        with ThreadPoolExecutor(12) as pool:
            flooding = [pool.submit(flood, i) for i in range(12)]  # 2 running + 8 waiting; 2 over acme's limit
            wait_until(lambda: _counter(httpx.get(f"{url}/metrics").text, "prefixflow_queued_requests") >= 6, 60,
                       0.1, message="acme's requests are not queued")
            for _ in range(2):
                sent = time.monotonic()
                stream = globex.completions.create(model="base", prompt="blue", max_tokens=4, temperature=0,
                                                   stream=True)
                next(iter(stream))
                first = time.monotonic()
                for _chunk in stream:
                    pass
                overtaken = sum(sent < t < first for t in finished)
                assert overtaken <= 1, f"{overtaken} of acme's requests ended before globex's first token"
            outcomes = [f.result() for f in flooding]
            text = httpx.get(f"{url}/metrics").text  # queue wait and time to first token, per caller's client
            assert _counter(text, "prefixflow_preemptions_total") >= 2  # one of acme's rows for each of globex's
            for name in ("prefixflow_queue_wait_by_client_seconds", "prefixflow_time_to_first_token_by_client_seconds"):
                assert _counter(text, f'{name}_count{{client="globex"}}') == 2
                assert _counter(text, f'{name}_count{{client="acme"}}') == outcomes.count("ok")
    refused = [o for o in outcomes if o != "ok"]
    assert refused and all("client 'acme' has" in o and "at most 8 per client" in o for o in refused), outcomes
    assert outcomes.count("ok") >= 8


def test_a_registered_version_loads_with_mlflow_pyfunc(server, keys, registry_home):
    """As a team serving through MLflow would: MLFLOW_TRACKING_URI set, ``mlflow.pyfunc.load_model`` by alias."""
    from prefixflow.services import tracking

    with patched_environ(registry_home["env"], unset=("MLFLOW_TRACKING_URI",)):
        uri = tracking.tracking_uri()
    code = ("import json, mlflow.pyfunc; m = mlflow.pyfunc.load_model('models:/globex-rev@champion'); "
            "print(json.dumps(m.predict(['red cat', 'moon'], params={'max_tokens': 8})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**_env(), "MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    c = client(server, keys["globex"])
    want = [c.completions.create(model="globex/rev@champion", prompt=p, max_tokens=8, temperature=0)
            .choices[0].text.strip() for p in ("red cat", "moon")]
    assert got == want


def test_serve_refuses_a_base_it_cannot_load_in_one_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "prefixflow.cli", "serve", "--base", str(tmp_path / "none"),
                        "--port", "1"], capture_output=True, text=True, timeout=120,
                       env={**_env(), "PREFIXFLOW_HOME": str(tmp_path)})
    assert r.returncode == 2 and "cannot load base model" in r.stderr and "Traceback" not in r.stderr + r.stdout
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys: [{client: acme, sha256: nothex}]")
    r = subprocess.run([sys.executable, "-m", "prefixflow.cli", "serve", "--keys", str(bad)],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2 and "entry 1 needs" in r.stderr


def test_keys_are_stored_hashed(keys):
    """No key in the file in plain text; each entry holds the SHA-256 hex digest of its client's key."""
    text = Path(keys["file"]).read_text()
    created = {client: key for client, key in keys.items() if client != "file"}
    assert not [client for client, key in created.items() if key in text]
    stored = sorted((e["client"], e["sha256"]) for e in yaml.safe_load(text)["keys"])
    assert stored == sorted((client, hashlib.sha256(key.encode()).hexdigest()) for client, key in created.items())


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _metrics_when(server: str, holds, message: str) -> str:
    """The server's metrics once ``holds(metrics text)`` (20 s at most)."""
    def check() -> str | None:
        metrics = httpx.get(f"{server}/metrics").text
        return metrics if holds(metrics) else None

    return wait_until(check, 20, 0.1, message=message)


def _idle(metrics: str) -> bool:
    """No row decoding and none waiting."""
    return all(_counter(metrics, name) == 0 for name in ("prefixflow_running_requests", "prefixflow_queued_requests"))


def _row_steps(metrics: str) -> float:
    """Rows x decode steps the engine has run (the batch-size histogram's sum): its work, in tokens."""
    return _counter(metrics, "prefixflow_batch_size_sum")


def _counter(metrics: str, name: str) -> float:
    """The value of the series ``name`` (with its labels, exactly as exported), 0 when absent."""
    for line in metrics.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _histogram(metrics: str, name: str) -> dict[str, float]:
    out = {}
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{le="):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out
