"""Serving benchmark: `prefixflow serve` under C concurrent streaming clients, each with its own prefix, on loopback.

Exact commands of the reported CPU runs (2-core shared CPU; 15 to 20 minutes each)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_serving.py --ignore-eos \
        --out benchmarks/results/serving_cpu_ignore_eos.json     # equal work per request (vLLM's ignore_eos)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_serving.py --keep-home   # requests end at EOS

Set-up (in a fresh temporary ``PREFIXFLOW_HOME``, embedded MLflow): the base is ``smollm2-135m``; 64 prefixes
``c00``..``c63`` are registered through the product's registration code (``registration.ensure_model`` +
``tracking.open_run`` + ``registration.publish``, alias ``champion``: ``c07/bench@champion``), P = 10 (the spec's
default ``prefix.num_virtual_tokens``), prompt template ``Table: {source}\\nSentence:``. Their tables are random but
of a trained prefix's scale: each layer's keys/values are drawn per (head, dim) channel from the mean and standard
deviation of the base's own cached keys/values over E2E prompts. The same tables are exported as PEFT adapters
(``PrefixArtifact.to_peft``). Prompts: distinct meaning representations of the E2E NLG dev set (``--data``), sent
as raw completion prompts (the server renders them through the prefix's template). Only sources that the bare base
continues greedily for the full ``max_tokens`` without EOS are used (screened in-process with DecodeEngine over the
first ``--screen`` sources): otherwise the base, which ends most E2E sentences at EOS after about 22 tokens, would
do less decoding per prefill than the prefixed requests and output tokens/s would not compare equal work.

Variants, each a real server process on 127.0.0.1 started here and stopped after, each with ``--threads`` torch
threads (1 by default, see the option):

- ``ours``: ``prefixflow serve --max-batch C`` (DecodeEngine); client i uses model ``c{i}/bench@champion``.
- ``base`` (target b): the same server process; every client uses model ``base`` with the template already applied,
  so prompts are token for token the same as ``ours``'s.
- ``peft`` (target a): the same HTTP server (``prefixflow.serving.app.run``) over ``PeftEngine``
  (benchmarks/peft_engine.py): one request at a time, FIFO, batch 1, a PeftModel holding the 64 adapters and
  switching adapter per request; prefill is one engine step, then one token per step. One process serves both C.

Load: C closed-loop clients (httpx + asyncio, one connection each), streaming ``/v1/completions`` with
``temperature 0``, ``max_tokens`` 32 and ``stream_options.include_usage``; a client sends its next request as soon
as the previous one ends. Warm-up: until every client has finished one request (this includes loading the
prefixes into the server's bank and, for PEFT, the first pass through the FIFO queue, whose latencies ramp up from
one request's time to C times it); then a measurement window of ``--duration`` seconds (``--peft-duration`` for
PEFT), after which the open requests are cancelled (the client disconnects; the server frees their rows) and the
server is checked idle. In the window: output tokens/s = tokens streamed inside it / its length (each content
chunk is one token; a completed request's remaining usage tokens are put on its last chunk); TTFT (request sent
to first non-empty text chunk) and latency (sent to end of stream) percentiles over the requests that ended inside
it. A prefix can still make a request end at EOS before 32 tokens: only tokens actually returned count.

Correctness: the streamed text of each (client, request number) that both ``ours`` and ``peft`` completed at the
same C is compared (same prefix, same prompt, greedy); the fraction of identical outputs is reported. Also
reported: how many ``ours`` outputs differ from ``base`` ones (the prefixes change the output).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TEMPLATE = "Table: {source}\nSentence:"
TASK = "bench"


# --- set-up: prefixes registered through the product, the same tables as PEFT adapters -------------------------
def read_sources(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return list(dict.fromkeys(r["mr"] for r in rows))  # distinct meaning representations, in file order


def kv_statistics(base, tok, sources: list[str]):
    """Per layer: mean and std over positions of the base's cached keys and values, per (head, dim) channel."""
    import torch
    from transformers import DynamicCache

    keys, values = None, None
    with torch.no_grad():
        for src in sources:
            ids = tok(TEMPLATE.format(source=src), return_tensors="pt")["input_ids"]
            cache = DynamicCache(config=base.config)
            base(input_ids=ids, cache=cache, use_cache=True)
            layer_k = [k[0, :, 1:] for k, v, *_ in cache]  # [H, T-1, D]: without the first position (a sink)
            layer_v = [v[0, :, 1:] for k, v, *_ in cache]
            keys = layer_k if keys is None else [torch.cat([a, b], 1) for a, b in zip(keys, layer_k, strict=True)]
            values = layer_v if values is None else [torch.cat([a, b], 1) for a, b in
                                                     zip(values, layer_v, strict=True)]
    return [(k.mean(1), k.std(1), v.mean(1), v.std(1)) for k, v in zip(keys, values, strict=True)]


def register_prefixes(n: int, p: int, base, tok, sources: list[str], home: Path) -> dict:
    """Register ``c00``..``c{n-1}`` (task ``bench``, alias champion) and export each to ``home/peft/NAME``."""
    import torch

    from prefix_core import PrefixArtifact
    from prefix_core.encoder import kv_to_table
    from prefixflow.services import registration, tracking

    stats = kv_statistics(base, tok, sources[:16])
    peft_dir = home / "peft"
    scale = {"key_std_mean": float(sum(s[1].mean() for s in stats) / len(stats)),
             "value_std_mean": float(sum(s[3].mean() for s in stats) / len(stats))}
    started = time.monotonic()
    for i in range(n):
        client = f"c{i:02d}"
        name = f"{client}-{TASK}"
        g = torch.Generator().manual_seed(1000 + i)
        keys, values = [], []
        for k_mean, k_std, v_mean, v_std in stats:
            h, d = k_mean.shape
            keys.append(k_mean[:, None] + k_std[:, None] * torch.randn(h, p, d, generator=g))
            values.append(v_mean[:, None] + v_std[:, None] * torch.randn(h, p, d, generator=g))
        table = kv_to_table(keys, values)
        art = PrefixArtifact.from_table(table, base, {"num_virtual_tokens": p, "projection_hidden": None},
                                        prompt_template=TEMPLATE)
        folder = home / "artifacts" / name
        art.save(folder)
        art.to_peft(peft_dir / name)
        registration.ensure_model(name, client, TASK, f"bench_serving prefix of {client}/{TASK}")
        run_id = tracking.open_run(f"prefixflow/{client}", f"bench-serving-{name}", name, {}, {})
        mv = registration.publish(name, folder, run_id, {"client": client, "task": TASK, "seed": str(1000 + i)})
        tracking.client().set_registered_model_alias(name, "champion", mv.version)
    return {"prefixes": n, "num_virtual_tokens": p, "template": TEMPLATE, "kv_scale": scale,
            "register_s": round(time.monotonic() - started, 1)}


def full_length_sources(base, tok, sources: list[str], max_tokens: int) -> list[str]:
    """The sources whose rendered prompt the bare base continues greedily for ``max_tokens`` tokens without EOS
    (DecodeEngine, in this process): with them every variant generates the same number of tokens per request."""
    from prefix_core import DecodeEngine

    engine = DecodeEngine(base, tok, max_batch=64)
    for i, src in enumerate(sources):
        engine.add(i, tok(TEMPLATE.format(source=src))["input_ids"], max_new_tokens=max_tokens)
    out = engine.run()
    return [src for i, src in enumerate(sources)
            if len(out[i]) == max_tokens and out[i][-1] not in engine.eos_token_ids]


# --- server processes -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server command on a free loopback port; ``start()`` waits for /health; ``stop()`` SIGTERMs its group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.name, self.argv, self.env, self.log = name, [*argv, "--port", str(self.port)], env, log
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> float:
        import httpx

        started = time.monotonic()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=HERE.parent)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > timeout:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.5)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_idle(url: str, timeout: float = 120) -> float | None:
    """Seconds until the server's running and queued gauges are both 0 (None: not within ``timeout``)."""
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        gauges = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith(("prefixflow_running_requests ", "prefixflow_queued_requests "))}
        if gauges and not any(gauges.values()):
            return time.monotonic() - started
        time.sleep(0.5)
    return None


# --- the load generator -----------------------------------------------------------------------------------------
class Record:
    __slots__ = ("chunks", "client", "end", "error", "finish", "first", "model", "n", "start", "text", "tokens")

    def __init__(self, client: int, n: int, model: str, start: float) -> None:
        self.client, self.n, self.model, self.start = client, n, model, start
        self.first = self.end = self.tokens = self.finish = self.error = None
        self.chunks: list[float] = []
        self.text = ""


async def one_request(http, url: str, rec: Record, prompt: str, max_tokens: int, ignore_eos: bool = False) -> None:
    body = {"model": rec.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **({"ignore_eos": True} if ignore_eos else {})}
    parts = []
    async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
            rec.end = time.monotonic()
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            now = time.monotonic()
            event = json.loads(data)
            if "error" in event:
                rec.error = str(event["error"])
                continue
            if event.get("usage"):
                rec.tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", ()):
                text = choice.get("text") or ""
                rec.chunks.append(now)
                if text and rec.first is None:
                    rec.first = now
                parts.append(text)
                if choice.get("finish_reason"):
                    rec.finish = choice["finish_reason"]
    rec.text = "".join(parts)
    rec.end = time.monotonic()


async def load_run(url: str, clients: int, model_of, prompt_of, max_tokens: int, duration: float,
                   max_warmup: float, ignore_eos: bool = False) -> dict:
    """C closed-loop clients; a warm-up until each has finished one request (at most ``max_warmup`` s), then a
    ``duration`` s window; open requests are cancelled at its end. Returns the records and the window."""
    import httpx

    records: list[Record] = []
    warm = [False] * clients
    all_warm = asyncio.Event()

    async def client_loop(cid: int) -> None:
        n = 0
        while True:
            model = model_of(cid)
            rec = Record(cid, n, model, time.monotonic())
            records.append(rec)
            try:
                await one_request(http, url, rec, prompt_of(cid, n, model), max_tokens, ignore_eos)
            except (httpx.HTTPError, json.JSONDecodeError) as err:
                rec.error, rec.end = f"{type(err).__name__}: {err}", time.monotonic()
            if rec.error is not None:
                await asyncio.sleep(0.5)  # no tight loop of failing requests
            n += 1
            if not warm[cid]:
                warm[cid] = True
                if all(warm):
                    all_warm.set()

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(30, read=1800)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        started = time.monotonic()
        tasks = [asyncio.create_task(client_loop(c)) for c in range(clients)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_warm.wait(), max_warmup)
        window_start = time.monotonic()
        await asyncio.sleep(duration)
        window_end = time.monotonic()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"records": records, "started": started, "window": (window_start, window_end),
            "all_warm": all_warm.is_set()}


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(run: dict) -> dict:
    w0, w1 = run["window"]
    records = run["records"]
    tokens_in_window = 0
    for r in records:
        counts = [1] * len(r.chunks)
        if counts and r.tokens is not None and r.tokens > len(counts):
            counts[-1] += r.tokens - len(counts)
        tokens_in_window += sum(c for t, c in zip(r.chunks, counts, strict=True) if w0 <= t < w1)
    done = [r for r in records if r.error is None and r.finish is not None and r.end is not None and w0 <= r.end < w1]
    ttft = [r.first - r.start for r in done if r.first is not None]
    latency = [r.end - r.start for r in done]
    finishes: dict[str, int] = {}
    for r in done:
        finishes[r.finish] = finishes.get(r.finish, 0) + 1
    r2 = lambda x: None if x is None else round(x, 3)  # noqa: E731
    return {
        "output_tokens_per_s": round(tokens_in_window / (w1 - w0), 2),
        "window_s": round(w1 - w0, 1),
        "warmup_s": round(w0 - run["started"], 1),
        "warmup_complete": run["all_warm"],
        "tokens_in_window": tokens_in_window,
        "requests_done_in_window": len(done),
        "requests_done_total": sum(1 for r in records if r.error is None and r.finish is not None),
        "errors": sum(1 for r in records if r.error is not None),
        "first_error": next((r.error for r in records if r.error is not None), None),
        "mean_completion_tokens": r2(sum(r.tokens or 0 for r in done) / len(done)) if done else None,
        "finish_reasons": finishes,
        "ttft_p50_s": r2(percentile(ttft, 50)), "ttft_p99_s": r2(percentile(ttft, 99)),
        "latency_p50_s": r2(percentile(latency, 50)), "latency_p99_s": r2(percentile(latency, 99)),
    }


def texts(run: dict) -> dict[tuple[int, int], str]:
    return {(r.client, r.n): r.text for r in run["records"] if r.error is None and r.finish is not None}


# --- main -------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "e2e" / "devset.csv"),
                    help="E2E NLG dev set CSV (default: ../shared/data/e2e/devset.csv from the repo)")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--clients", default="16,64", help="comma-separated concurrency levels")
    ap.add_argument("--prefixes", type=int, default=64, help="prefixes registered (client i uses prefix i %% N)")
    ap.add_argument("--virtual-tokens", type=int, default=None,
                    help="P (default: the spec's default prefix.num_virtual_tokens)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="send ignore_eos (vLLM's extension): every request runs max_tokens, so every variant does "
                         "the same work per request whatever its prefix makes the text end with")
    ap.add_argument("--screen", type=int, default=256,
                    help="use only those of the first N distinct sources that the bare base continues for max_tokens "
                         "without EOS (0: every source, whatever length it generates)")
    ap.add_argument("--duration", type=float, default=90, help="measurement window of ours and base (s)")
    ap.add_argument("--peft-duration", type=float, default=120, help="measurement window of PEFT (s)")
    ap.add_argument("--max-warmup", type=float, default=420, help="longest warm-up before the window opens (s)")
    ap.add_argument("--variants", default="ours,base,peft")
    ap.add_argument("--device", default="cpu", help="device of every server")
    ap.add_argument("--precision", default="auto",
                    help="dtype of every server's base (auto: bf16 only where the CPU runs it natively)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of every server process (OMP_NUM_THREADS; 0: torch's default). 1 by default: "
                         "on a 2-core machine shared with other jobs, 2 OpenMP threads per forward stall whenever "
                         "another process takes a core (decode steps measured 2-10x slower and erratic)")
    ap.add_argument("--server-args", default="", help="more `prefixflow serve` options for ours and base, e.g. "
                    "'--prefill-chunk 512'")
    ap.add_argument("--home", default=None, help="PREFIXFLOW_HOME to create (default: a new temporary folder)")
    ap.add_argument("--keep-home", action="store_true", help="keep the temporary PREFIXFLOW_HOME (logs, registry)")
    ap.add_argument("--out", default=str(RESULTS / "serving_cpu.json"))
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    variants = args.variants.split(",")
    bench_started = time.monotonic()

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="bench_serving_"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFIXFLOW_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    env = {**os.environ, "PREFIXFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    import peft
    import torch
    import transformers

    from prefix_core import load_base_model
    from prefixflow.services.spec import PrefixSpec

    p = args.virtual_tokens or PrefixSpec().num_virtual_tokens
    all_sources = read_sources(Path(args.data))
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = load_base_model(args.base)
    started = time.monotonic()
    screened = all_sources[: args.screen] if args.screen else all_sources
    sources = full_length_sources(base, tok, screened, args.max_tokens) if args.screen else screened
    print(f"{len(sources)} of the first {len(screened)} sources run {args.max_tokens} tokens without EOS on the bare "
          f"base ({time.monotonic() - started:.0f} s)", flush=True)
    if not sources:
        raise SystemExit("no source runs the full max_tokens on the bare base; lower --max-tokens or use --screen 0")
    print(f"PREFIXFLOW_HOME={home}; registering {args.prefixes} prefixes (P={p}) ...", flush=True)
    setup = register_prefixes(args.prefixes, p, base, tok, all_sources, home)
    print(f"  registered in {setup['register_s']} s", flush=True)

    def model_of(cid: int) -> str:
        return f"c{cid % args.prefixes:02d}/{TASK}@champion"

    def source_of(cid: int, n: int) -> str:
        return sources[(cid * 37 + n * 101) % len(sources)]  # a different prompt per client and request

    def prompt_of(cid: int, n: int, model: str) -> str:
        src = source_of(cid, n)
        return TEMPLATE.format(source=src) if model == "base" else src  # base: rendered here, same tokens

    prompt_tokens = [len(tok(TEMPLATE.format(source=s))["input_ids"]) for s in sources]
    del base

    serve_cmd = [sys.executable, "-m", "prefixflow.cli", "serve", "--base", args.base, "--device", args.device,
                 "--max-queued", "512", "--max-tokens", str(max(64, args.max_tokens)), "--refresh", "0",
                 "--precision", args.precision, *args.server_args.split()]
    peft_cmd = [sys.executable, str(HERE / "peft_engine.py"), "--adapters", str(home / "peft"), "--base", args.base,
                "--max-queued", "512", "--max-tokens", str(max(64, args.max_tokens)), "--precision", args.precision]
    runs: dict[str, dict] = {}

    def portable(argv: list[str]) -> str:
        """A server's command line without this machine's paths."""
        words = ["python" if a == sys.executable else a for a in argv[:-2]]  # without --port N
        return " ".join(w.replace(str(home), "$PREFIXFLOW_HOME").replace(str(HERE.parent) + "/", "") for w in words)

    outputs: dict[str, dict] = {}
    servers: dict[str, dict] = {}

    def measure(name: str, server: ServerProcess, clients: int, model, duration: float) -> None:
        print(f"  {name}: {clients} clients, window {duration:.0f} s ...", flush=True)
        cpu0, usage0, load0 = server.cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF), os.getloadavg()
        run = asyncio.run(load_run(server.url, clients, model, prompt_of, args.max_tokens, duration,
                                   args.max_warmup, args.ignore_eos))
        idle = wait_idle(server.url)
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - run["started"]
        summary = summarize(run)
        summary.update({
            "clients": clients, "variant": name.split("@")[0],
            "server_cpu_s": round(server.cpu_seconds() - cpu0, 1),
            "client_cpu_s": round(usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime, 1),
            "wall_s": round(wall, 1), "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "idle_after_s": None if idle is None else round(idle, 1),
        })
        runs[name] = summary
        outputs[name] = texts(run)
        print(f"    {summary['output_tokens_per_s']:.1f} tok/s, TTFT p50/p99 {summary['ttft_p50_s']}/"
              f"{summary['ttft_p99_s']} s, latency p50/p99 {summary['latency_p50_s']}/{summary['latency_p99_s']} s, "
              f"{summary['requests_done_in_window']} requests in window, {summary['errors']} errors, "
              f"warm-up {summary['warmup_s']} s, server CPU {summary['server_cpu_s']} s / wall {summary['wall_s']} s",
              flush=True)

    peft_server = None
    try:
        for clients in levels:
            if "ours" in variants or "base" in variants:
                server = ServerProcess(f"ours-{clients}", [*serve_cmd, "--max-batch", str(clients)], env,
                                       home / f"serve-ours-{clients}.log")
                ready = server.start()
                servers[f"ours@{clients}"] = {"argv": portable(server.argv), "ready_s": round(ready, 1)}
                print(f"prefixflow serve --max-batch {clients} ready in {ready:.1f} s", flush=True)
                try:
                    if "ours" in variants:
                        measure(f"ours@{clients}", server, clients, model_of, args.duration)
                    if "base" in variants:
                        measure(f"base@{clients}", server, clients, lambda cid: "base", args.duration)
                finally:
                    server.stop()
            if "peft" in variants:
                if peft_server is None:
                    peft_server = ServerProcess("peft", peft_cmd, env, home / "serve-peft.log")
                    ready = peft_server.start()
                    servers["peft"] = {"argv": portable(peft_server.argv), "ready_s": round(ready, 1)}
                    print(f"PEFT server ready in {ready:.1f} s", flush=True)
                measure(f"peft@{clients}", peft_server, clients, model_of, args.peft_duration)
    finally:
        if peft_server is not None:
            peft_server.stop()

    # --- correctness and ratios ---------------------------------------------------------------------------------
    correctness = {}
    for clients in levels:
        ours, other = outputs.get(f"ours@{clients}"), outputs.get(f"peft@{clients}")
        bare = outputs.get(f"base@{clients}")
        entry = {}
        if ours and other:
            common = sorted(set(ours) & set(other))
            same = [k for k in common if ours[k] == other[k]]
            entry["ours_vs_peft"] = {"compared": len(common), "identical": len(same),
                                     "fraction": round(len(same) / len(common), 3) if common else None,
                                     "differing": [{"client": k[0], "request": k[1], "ours": ours[k],
                                                    "peft": other[k]} for k in common if ours[k] != other[k]][:5]}
        if ours and bare:
            common = sorted(set(ours) & set(bare))
            entry["ours_differs_from_base"] = {"compared": len(common),
                                               "different": sum(ours[k] != bare[k] for k in common)}
        if ours:
            entry["distinct_outputs_ours"] = len(set(ours.values()))
            entry["sample_ours"] = [ours[k] for k in sorted(ours)[:3]]
        correctness[str(clients)] = entry
    ratios, targets = {}, {}
    for clients in levels:
        ours, bare, other = (runs.get(f"{v}@{clients}") for v in ("ours", "base", "peft"))
        if ours and other and other["output_tokens_per_s"]:  # a variant that served nothing has no ratio
            r = ours["output_tokens_per_s"] / other["output_tokens_per_s"]
            ratios[f"ours_over_peft@{clients}"] = round(r, 2)
            targets[f"ours_over_peft_ge_4@{clients}"] = r >= 4
        if ours and bare and bare["output_tokens_per_s"]:
            r = ours["output_tokens_per_s"] / bare["output_tokens_per_s"]
            ratios[f"ours_over_base@{clients}"] = round(r, 3)
            targets[f"ours_at_most_10pct_below_base@{clients}"] = r >= 0.9

    cpu_name = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")),
        platform.processor())
    results = {
        "benchmark": "serving",
        "command": " ".join(["HF_HUB_OFFLINE=1", ".venv/bin/python", "benchmarks/bench_serving.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_name, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
        "torch_threads_per_server": args.threads or torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "setup": {**setup, "base": args.base, "data": Path(args.data).name, "distinct_sources": len(all_sources),
                  "sources_screened": len(screened), "sources_used": len(sources),
                  "prompt_tokens_min_mean_max": [min(prompt_tokens), round(sum(prompt_tokens) / len(prompt_tokens), 1),
                                                 max(prompt_tokens)],
                  "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos, "precision": args.precision,
                  "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "duration_s": args.duration,
                  "peft_duration_s": args.peft_duration,
                  "max_warmup_s": args.max_warmup, "clients": levels,
                  "server_max_batch": "C (ours and base); PEFT: 1 by construction", "server_max_queued": 512},
        "servers": servers,
        "runs": runs,
        "ratios": ratios,
        "targets": targets,
        "correctness": correctness,
        "server_log_problems": {log.name: sum(line.startswith(("ERROR", "Traceback")) or " ERROR " in line
                                              for line in log.read_text().splitlines())
                                for log in sorted(home.glob("serve-*.log"))},
        "total_wall_s": round(time.monotonic() - bench_started, 1),
    }
    print(f"\n{'variant':>8} {'C':>3} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>8} {'lat p99':>8} "
          f"{'done':>5} {'err':>4}")
    for clients in levels:
        for v in ("ours", "base", "peft"):
            s = runs.get(f"{v}@{clients}")
            if s:
                print(f"{v:>8} {clients:>3} {s['output_tokens_per_s']:8.1f} {s['ttft_p50_s']!s:>9} "
                      f"{s['ttft_p99_s']!s:>9} {s['latency_p50_s']!s:>8} {s['latency_p99_s']!s:>8} "
                      f"{s['requests_done_in_window']:>5} {s['errors']:>4}")
    print(f"ratios: {ratios}\ntargets: {targets}")
    for clients, entry in correctness.items():
        print(f"correctness @{clients}: " + json.dumps({k: v for k, v in entry.items() if k != "sample_ours"})[:600])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out} (total {results['total_wall_s']} s)")
    if args.keep_home or args.home:
        print(f"kept {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
