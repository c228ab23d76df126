"""Domain errors raised by services; the API maps each to an RFC 9457 problem response."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error a caller can cause and fix. `status` is the HTTP status it maps to."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidInput(DomainError):
    status = 422
    title = "Invalid input"


class NotFound(DomainError):
    status = 404
    title = "Not found"


class Forbidden(DomainError):
    status = 403
    title = "Forbidden"


class Unauthenticated(DomainError):
    status = 401
    title = "Unauthenticated"


class Conflict(DomainError):
    status = 409
    title = "Conflict"


class TooManyRequests(DomainError):
    """Over a rate limit; `retry_after_s` (in `extra`) says when to try again."""

    status = 429
    title = "Too many requests"


class Unavailable(DomainError):
    """The database (or the scheduler) is away for now: try again."""

    status = 503
    title = "Service unavailable"


class SecretsNotConfigured(DomainError):
    """A job with secret variables sent to a server that has no key to encrypt them."""

    status = 422
    title = "Secrets not configured"
