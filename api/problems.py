"""RFC 9457 problem responses: every error a client sees is `application/problem+json`.

Domain errors carry their own status and detail; validation errors list the fields and short
messages, never the values sent; an unreachable database is 503 with `Retry-After` (the client
should simply try again); anything else is a 500 that names no internals (the traceback goes to
the server log only).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.db.engine import error_line, sqlstate
from scheduler.services.errors import DomainError

log = logging.getLogger("fairgpu.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://fairgpu.dev/problems/"
RETRY_AFTER_S = 5
MAX_LISTED_ERRORS = 20

_TITLES = {
    400: "Bad request",
    401: "Unauthenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Invalid input",
    429: "Too many requests",
    431: "Request header fields too large",
    500: "Internal server error",
    503: "Service unavailable",
}


def _slug(title: str) -> str:
    return title.lower().replace(" ", "-")


def problem_body(
    status: int, detail: str, instance: str, *, title: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The RFC 9457 document for `status`; `instance` is the request's path."""
    title = title or _TITLES.get(status, "Error")
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + _slug(title),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    for key, value in extra.items():
        body.setdefault(key, value)
    return body


def problem(
    request: Request,
    status: int,
    detail: str,
    *,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, detail, request.url.path, title=title, **extra),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=dict(headers) if headers else None,
    )


WEBSOCKET_DENIAL = "websocket.http.response"
"""The ASGI extension by which a server answers a WebSocket handshake with a response."""
MAX_ERROR_CHARS = 200
"""A listed field or message is clipped to this: neither may carry much of what was sent."""


def _clipped(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    # A dict key (an env name, an unknown field) is input too: each part is clipped.
    return _clipped(".".join(str(part)[:64] for part in loc))


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
    if exc.status == 429:
        headers = {"Retry-After": str(exc.extra.get("retry_after_s", 1))}
    if exc.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return problem(request, exc.status, exc.detail, title=exc.title, headers=headers, **exc.extra)


def _validation_summary(exc: RequestValidationError | WebSocketRequestValidationError) -> tuple[
    str, list[dict[str, str]]
]:  # fmt: skip
    # Only where and what: pydantic's `input` (and `ctx`) would echo what was sent, which may
    # be a secret, into the answer and into anything that logs it.
    errors = [
        {
            "field": _location(err.get("loc", ())),
            "message": _clipped(str(err.get("msg", "invalid"))),
        }
        for err in exc.errors()[:MAX_LISTED_ERRORS]
    ]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:3])
    more = len(exc.errors()) - 3
    if more > 0:
        summary += f" (and {more} more)"
    return summary or "invalid request", errors


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    summary, errors = _validation_summary(exc)
    return problem(request, 422, summary, errors=errors)


async def _websocket_validation_error(websocket: WebSocket, exc: Exception) -> None:
    """A stream's bad path or query (`?rank=abc`, no `port`) as the 422 problem every route
    gives, instead of a bare 403 that reads as "forbidden"; a close 1008 with the sentence
    where the server cannot answer a handshake itself."""
    assert isinstance(exc, WebSocketRequestValidationError)
    summary, errors = _validation_summary(exc)
    if WEBSOCKET_DENIAL in (websocket.scope.get("extensions") or {}):
        await websocket.send_denial_response(
            JSONResponse(
                problem_body(422, summary, websocket.url.path, errors=errors),
                status_code=422,
                media_type=PROBLEM_MEDIA_TYPE,
            )
        )
        return
    await websocket.accept()
    await websocket.close(1008, summary.encode()[:123].decode("utf-8", "ignore"))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "Error")
    return problem(request, exc.status_code, detail, headers=exc.headers)


async def _integrity_error(request: Request, exc: Exception) -> JSONResponse:
    """A uniqueness or reference race the service could not see coming: the client may retry."""
    log.info("integrity error on %s: %s", request.url.path, error_line(exc))
    return problem(request, 409, "the request conflicts with data stored meanwhile; retry")


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable on %s: %s", request.url.path, error_line(exc))
    return problem(
        request,
        503,
        "the database is unavailable; retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if exc.connection_invalidated or _is_connect_failure(exc):
        return await _database_unavailable(request, exc)
    if sqlstate(exc) in _TRANSIENT_SQLSTATES:
        # The database aborted this transaction to break a deadlock (for instance a cancel
        # meeting the scheduler's start of the same org's jobs over pending_job_counts):
        # nothing was stored; the same request succeeds when sent again.
        log.info("transient database conflict on %s: %s", request.url.path, exc)
        return problem(
            request,
            503,
            "the request met a concurrent change and was not applied; retry shortly",
            headers={"Retry-After": "1"},
        )
    return await _unexpected(request, exc)


# Deadlock detected, serialization failure: the transaction was rolled back as a whole.
_TRANSIENT_SQLSTATES = ("40P01", "40001")


# SQLSTATEs of a server that is unreachable or going away: class 08 (connection exception),
# 57P01..57P03 (admin/crash shutdown, "the database system is shutting down/starting up").
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def _is_connect_failure(exc: DBAPIError) -> bool:
    orig = exc.orig
    if isinstance(orig, OSError | ConnectionError):
        return True
    if sqlstate(exc).startswith(_UNAVAILABLE_SQLSTATES):
        return True
    name = type(orig).__name__ if orig is not None else ""
    text = str(orig).lower()
    return name in ("OperationalError", "InterfaceError", "CannotConnectNowError") and any(
        word in text
        for word in ("connect", "connection", "refused", "closed", "unable to open", "locked")
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(request, 500, "internal error; it has been logged")


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
}


def _document_problems(app: FastAPI) -> None:
    """The generated OpenAPI says error responses are `application/json`; they are problems."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = (
                PROBLEM_SCHEMA
            )
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    for code, response in operation.get("responses", {}).items():
                        if code[:1] in ("4", "5") and "application/json" in response.get(
                            "content", {}
                        ):
                            ref = {"$ref": "#/components/schemas/Problem"}
                            response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": ref}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_problem_handlers(app: FastAPI) -> None:
    _document_problems(app)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(WebSocketRequestValidationError, _websocket_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(DisconnectionError, _database_unavailable)
    app.add_exception_handler(PoolTimeoutError, _database_unavailable)
    app.add_exception_handler(ConnectionError, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected)
