"""The HTTP API of ``prefixflow serve`` (FastAPI): OpenAI's ``/v1/completions``, ``/v1/chat/completions`` and
``/v1/models``, plus ``/health`` (200 once the base is loaded) and ``/metrics`` (Prometheus text).

``model`` in a request names a registered prefix (``CLIENT/TASK@ALIAS``, ``CLIENT/TASK/VERSION``,
``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) or ``base`` (the base model without a prefix). Errors come
in OpenAI's shape with 400 (bad request), 401 (no or unknown key), 403 (another client's prefix), 404 (no such
model), 429 (rate limit or full queue, with ``Retry-After``) or 503 (still loading).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from prefix_core.template import render
from prefixflow.serving import openai_api as oa
from prefixflow.serving import openapi_doc
from prefixflow.serving.bank import BASE, Prefix
from prefixflow.serving.keys import Caller
from prefixflow.serving.server import Choice, ServeConfig, Server

# Deferred imports: uvicorn is deferred to run(): the tests build the app without it.

CLIENT_GONE = 499  # nginx's code for "the client closed the request" (only in metrics; nobody receives it)


def create_app(server: Server) -> FastAPI:
    """The ASGI app over ``server`` (its base loads when the app starts)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        server.stop()

    app = FastAPI(title="prefixflow serve", version="1", lifespan=lifespan)
    app.state.server = server
    openapi_doc.install(app)

    @app.exception_handler(oa.APIError)
    async def api_error(request: Request, err: oa.APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        message, param = oa.validation_message(err.errors())
        return JSONResponse(oa.APIError(400, message, param=param).body(), status_code=400)

    app.add_middleware(_CountRequests, server=server)

    def authorize(authorization: str | None) -> Caller:
        server.check_ready()
        return server.caller(authorization)

    async def served_prefix(body, caller: Caller, request: Request):
        """The prefix a generation request uses; a canary model's request is marked for _CountRequests."""
        prefix = await server.prefix_for(body.model, caller, body.user)
        request.state.prefixflow_canary = server.canaries.label(prefix)
        return prefix

    @app.get("/health")
    async def health():
        if server.ready.is_set():
            return {"status": "ready", "base": server.base_name}
        status = "failed" if server.load_error else "loading"
        return JSONResponse({"status": status, "base": server.base_name, "error": server.load_error},
                            status_code=503)

    @app.get("/metrics", responses=openapi_doc.responses("/metrics"), response_class=PlainTextResponse)
    async def metrics():
        if server.canaries is not None:
            server.canaries.prune()
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=openapi_doc.responses("/v1/models"))
    async def list_models(authorization: str | None = Header(None)):
        caller = authorize(authorization)
        return {"object": "list", "data": await run_in_threadpool(_models, caller)}

    @app.get("/v1/models/{model:path}", responses=openapi_doc.responses("/v1/models/{model}"))
    async def get_model(model: str, authorization: str | None = Header(None)):
        caller = authorize(authorization)
        if model != BASE:
            await server.prefix_for(model, caller)  # 403/404 as for generation
        return {"id": model, "object": "model", "created": 0, "owned_by": "prefixflow"}

    def _models(caller: Caller) -> list[dict]:
        data = [{"id": BASE, "object": "model", "created": 0, "owned_by": "prefixflow"}]
        for m in server.registered_models():
            client, task = m.tags.get("client"), m.tags.get("task")
            if not caller.may_use(client):
                continue
            for alias in sorted(m.aliases or {}):
                ref = f"{client}/{task}@{alias}" if client and task else f"models:/{m.name}@{alias}"
                data.append({"id": ref, "object": "model", "created": int((m.creation_timestamp or 0) / 1000),
                             "owned_by": client or "prefixflow"})
        return data

    @app.post("/v1/completions", responses=openapi_doc.responses("/v1/completions"))
    async def completions(body: oa.CompletionRequest, request: Request, authorization: str | None = Header(None)):
        caller = authorize(authorization)
        prefix = await served_prefix(body, caller, request)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if all(isinstance(p, int) for p in prompts):
            prompts = [prompts]
        ids = []
        for p in prompts:
            if isinstance(p, str):
                text = render(prefix.template, p) if prefix is not None and prefix.template else p
                ids.append(list(server.tokenizer(text)["input_ids"]))
            else:
                ids.append([int(t) for t in p])
        limit = body.max_tokens or 16
        return await _generate(request, body, caller, prefix, ids, limit, chat=False)

    @app.post("/v1/chat/completions", responses=openapi_doc.responses("/v1/chat/completions"))
    async def chat(body: oa.ChatRequest, request: Request, authorization: str | None = Header(None)):
        caller = authorize(authorization)
        prefix = await served_prefix(body, caller, request)
        tok = server.tokenizer
        if not getattr(tok, "chat_template", None):
            raise oa.APIError(400, f"the base model {server.base_name!r} has no chat template; use /v1/completions",
                              code="no_chat_template")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        limit = body.limit
        if limit is None:  # as much as fits (the model's positions, a row's KV memory), up to the server's limit
            room = _positions(server) - (prefix.num_virtual_tokens if prefix else 0) - len(ids)
            room = min(room, getattr(server.loop.engine, "max_columns", room) - len(ids))
            limit = max(1, min(server.config.max_tokens, room))
        return await _generate(request, body, caller, prefix, [ids], limit, chat=True)

    async def _generate(request: Request, body, caller: Caller, prefix: Prefix | None, prompts: list[list[int]],
                        max_tokens: int, chat: bool):
        if max_tokens > server.config.max_tokens:
            raise oa.APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of "
                                   f"{server.config.max_tokens} per request", param="max_tokens")
        if any(not p for p in prompts):
            raise oa.APIError(400, "the prompt is empty", param="prompt")
        rid = server.request_id(chat)
        params = body.sampling(max_tokens)
        if body.response_format is not None and body.response_format.type != "text":
            params = replace(params, constraint=await server.constraint(body.response_format.wire()))
        rows = server.rows(prompts, body.n, prefix, params, rid, client=share_of(caller))
        started = time.monotonic()
        await server.admit(rows)
        prompt_tokens = sum(len(p) for p in prompts)
        server.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in rows))
        choices = [Choice(server.tokenizer, body.stops) for _ in rows]
        timing = _Timing(server, started, len(rows), share_of(caller))
        # what the client used, as its responses' usage says (prompt tokens once per prompt, every completion token
        # returned, also of a request cut short by a disconnect): counted when the request ends
        counted = _Counted(server, usage_client(caller, prefix), prompt_tokens, choices, body.model)

        if body.stream:
            async def events():
                try:
                    if chat:
                        for i in range(len(rows)):
                            yield oa.chunk(rid, body.model, i, None, None, chat, first=True)
                    async for i, out in server.tokens(rows):
                        if choices[i].finish:
                            continue
                        timing.token(i, out.finished)
                        text = choices[i].add(out)
                        if text or choices[i].finish:
                            yield oa.chunk(rid, body.model, i, text, choices[i].finish, chat,
                                           logprobs=choices[i].logprobs(chat, new=True))
                except oa.APIError as err:
                    yield oa.sse(err.body())
                    return
                finally:
                    counted()
                if body.include_usage:
                    yield oa.usage_chunk(rid, body.model, _usage(prompt_tokens, choices), chat)
                yield oa.sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect() -> None:
            async for i, out in server.tokens(rows):
                if not choices[i].finish:
                    timing.token(i, out.finished)
                    choices[i].add(out)

        task = asyncio.create_task(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()  # server.tokens cancels the unfinished rows: their batch rows are freed
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    return Response(status_code=CLIENT_GONE)
            task.result()
        finally:
            counted()
        return oa.completion(rid, body.model, [(c.text, c.finish, c.logprobs(chat)) for c in choices],
                             _usage(prompt_tokens, choices), chat)

    return app


class _CountRequests:
    """Counts answered ``/v1/`` requests by route and status (and, for a canary model, by version:
    ``serving.canary_watch``). A plain ASGI middleware: it leaves ``receive``
    alone, so handlers still see a client's disconnect."""

    def __init__(self, app, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: list[int] = []
        started = time.monotonic()

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            if status and route is not None and route.path.startswith("/v1/"):
                self.server.metrics.requests.labels(route.path, str(status[0])).inc()
                canary = scope.get("state", {}).get("prefixflow_canary")
                if canary is not None:
                    self.server.canaries.record(canary, status[0], time.monotonic() - started)


class _Timing:
    """Per-row time to first token, time per output token and latency, into the server's histograms."""

    def __init__(self, server: Server, started: float, rows: int, client: str) -> None:
        self.metrics, self.started, self.client = server.metrics, started, client
        self.first: list[float | None] = [None] * rows
        self.count = [0] * rows

    def token(self, i: int, finished: bool) -> None:
        now = time.monotonic()
        self.count[i] += 1
        self.metrics.completion_tokens.inc()
        if self.first[i] is None:
            self.first[i] = now
            self.metrics.ttft.observe(now - self.started)
            self.metrics.client_ttft.labels(self.client).observe(now - self.started)
        if finished:
            self.metrics.latency.observe(now - self.started)
            if self.count[i] > 1:
                self.metrics.tpot.observe((now - self.first[i]) / (self.count[i] - 1))


class _Counted:
    """Counts one admitted request for its client and ``model`` (as named) once, when called at its end."""

    def __init__(self, server: Server, client: str, prompt_tokens: int, choices: list[Choice], model: str) -> None:
        self.server, self.client, self.prompt_tokens, self.choices = server, client, prompt_tokens, choices
        self.model, self.done = model, False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.server.count_usage(self.client, 1, self.prompt_tokens, sum(len(c.ids) for c in self.choices),
                                    model=self.model)


def share_of(caller: Caller) -> str:
    """Whose fair share of the server a request uses: the caller's client (each admin key its own)."""
    return f"admin:{caller.key_id}" if caller.is_admin else caller.client


def usage_client(caller: Caller, prefix: Prefix | None) -> str:
    """Whose use a request is: the client that owns the prefix it names, else the caller's client, else ``-``
    (the bare base called with an admin key or on an open server)."""
    if prefix is not None and prefix.client:
        return prefix.client
    return "-" if caller.is_admin else caller.client


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    return oa.usage(prompt_tokens, sum(len(c.ids) for c in choices))


def _positions(server: Server) -> int:
    return int(getattr(server.base.config, "max_position_embeddings", None) or 2048)


def run(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, engine_factory=None,
        log_level: str = "info") -> Server:
    """Serve until interrupted (SIGINT/SIGTERM stop it gracefully). Returns the Server (``load_error`` set when
    the base could not be loaded: the process should exit with an error)."""
    import uvicorn

    logger = logging.getLogger("prefixflow.serving")  # its modules' lines (loads, alias moves) beside uvicorn's
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if log_level in ("info", "debug") else logging.WARNING)
        logger.propagate = False
    server = Server(config, engine_factory)
    web = uvicorn.Server(uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level,
                                        timeout_graceful_shutdown=10))
    server.on_fatal = lambda: setattr(web, "should_exit", True)
    web.run()
    return server
