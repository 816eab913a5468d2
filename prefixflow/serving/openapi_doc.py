"""The server's OpenAPI document (``/openapi.json``), made to say what the server does: every status a route
answers with OpenAI's error shape (FastAPI's default lists only 200 and a 422 the server never sends: a body it
cannot read is a 400 here), the ``Retry-After`` header of a 429 and a 503, and the forms the ``model`` field takes.
Schemathesis checks the document against a running server (``tests/test_serve.py``).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


DESCRIPTION = ("OpenAI-compatible completions and chat over one frozen base model and the prefixes registered for it "
               "(prefix tuning). Errors come in OpenAI's shape: {\"error\": {\"message\", \"type\", \"param\", "
               "\"code\"}}.")
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_WHY = {
    400: "the request is invalid: malformed JSON, an unknown or unsupported argument, a value out of range, a "
         "prompt longer than the model's context, a reference that is not one",
    401: "no API key, or an unknown one (servers started with --keys)",
    403: "the key's client may not use this prefix (another client's)",
    404: "no such model: the registered model, version or alias does not exist",
    429: "the server's queue, or this client's part of it, is full; retry after Retry-After seconds",
    500: "generation failed on the server (the request's rows are freed; others go on)",
    503: "the base model is still loading (or failed to load), or the server is shutting down",
}
ROUTE_STATUSES = {
    "/v1/models": (401, 503),
    "/v1/models/{model}": (400, 401, 403, 404, 503),
    "/v1/completions": (400, 401, 403, 404, 429, 500, 503),
    "/v1/chat/completions": (400, 401, 403, 404, 429, 500, 503),
}


_OK = {  # 200 bodies other than JSON
    "/metrics": {"description": "Prometheus text format"},
    "/v1/completions": {"description": "the completion; with stream: true, server-sent events",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}}},
    "/v1/chat/completions": {"description": "the chat completion; with stream: true, server-sent events",
                             "content": {"text/event-stream": {"schema": {"type": "string"}}}},
}


def responses(path: str) -> dict:
    """The ``responses=`` of a route: its error statuses, each with OpenAI's error body (and the 200 body's other
    content types)."""
    out: dict = {200: _OK[path]} if path in _OK else {}
    out.update({status: {"model": ErrorBody, "description": _WHY[status],
                         **({"headers": _RETRY_AFTER} if status in (429, 503) else {})}
                for status in ROUTE_STATUSES.get(path, ())})
    return out


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` with the document above (built once): no 422 anywhere, and ``/health`` answering
    503 while loading."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=DESCRIPTION, routes=app.routes)
            for path, item in doc.get("paths", {}).items():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
                    if path == "/health":
                        operation["responses"]["503"] = {"description": "the base model is loading or failed"}
            for name in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
