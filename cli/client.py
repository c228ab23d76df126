"""The CLI's HTTP client: every failure becomes one line on stderr and a non-zero exit.

Commands call `api()` for a client bound to the configured server and token, and its `get`,
`post`, `put`, `patch`, `delete` return decoded JSON. Problem JSON (RFC 9457), connection errors,
timeouts and 401s are turned into `fairgpu: error: ...` by `fail`, never a traceback. The wire
is cli/connection.py (standard library only, for start-up time).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from cli.common import fail
from cli.config import Credentials, login_command, resolve
from cli.connection import RESENDABLE, Connection, Response, Timeout, TransportError
from protocol.transport import plain_http_refusal

if TYPE_CHECKING:
    import ssl

DEFAULT_TIMEOUT_S = 30.0
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_NOT_FOUND = 5


RETRY_MAX_WAIT_S = 120.0
"""The longest one request waits in all for the server's Retry-After (429, and 503 for a
read), unless FAIRGPU_RETRY_MAX_S says otherwise (0: fail at once)."""
RETRY_MAX_EACH_S = 60.0
"""A Retry-After beyond this is waited as this (a server's mistake must not hang a command)."""


class ApiError(Exception):
    """The server answered with an error; `detail` is the problem's human sentence."""

    def __init__(
        self, status: int, detail: str, body: Any = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{detail} (HTTP {status})")
        self.status = status
        self.detail = detail
        self.body = body
        self.retry_after_s = retry_after_s
        """The server's Retry-After in seconds, when it sent one (delay-seconds only)."""


def retry_after_of(value: str | None) -> float | None:
    """Retry-After as seconds; None when absent or an HTTP date (fairgpu sends seconds)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


class Patience:
    """How long a command still waits for a busy server: each refusal with Retry-After is
    waited (bounded) with one line on stderr, until the budget is spent."""

    def __init__(self, budget_s: float | None = None) -> None:
        if budget_s is None:
            budget_s = _retry_budget_s()
        self.left_s = budget_s

    def wait(self, exc: ApiError, what: str) -> bool:
        """Slept as the server asked: True (try again). False: no Retry-After, or no time."""
        if exc.retry_after_s is None or self.left_s <= 0:
            return False
        delay = min(max(exc.retry_after_s, 0.1), RETRY_MAX_EACH_S, self.left_s)
        self.left_s -= delay
        sys.stderr.write(
            f"fairgpu: {what}: server busy (HTTP {exc.status}): {exc.detail}; "
            f"retrying in {delay:g} s\n"
        )
        sys.stderr.flush()
        time.sleep(delay)
        return True


def _retry_budget_s() -> float:
    raw = os.environ.get("FAIRGPU_RETRY_MAX_S")
    if raw is None:
        return RETRY_MAX_WAIT_S
    try:
        return max(0.0, float(raw))
    except ValueError:
        fail(f"FAIRGPU_RETRY_MAX_S={raw!r}: expected seconds (0: never wait)", 2)


def problem_detail(response: Response) -> str:
    """The sentence a person needs from an error reply, whatever shape the body has."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip().splitlines()
        return text[0][:300] if text else response.reason
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("title")
        if isinstance(detail, list):  # FastAPI's own validation shape, should a route skip ours
            return "; ".join(str(d.get("msg", d)) for d in detail if isinstance(d, dict))[:300]
        if detail:
            return str(detail).splitlines()[0][:300]
    return response.reason


class Client:
    def __init__(self, creds: Credentials, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        refusal = plain_http_refusal(creds.server)
        if refusal and not creds.insecure:
            fail(refusal, 2)
        headers = {"User-Agent": "fairgpu-cli", "Accept": "application/json"}
        if creds.token:
            headers["Authorization"] = f"Bearer {creds.token}"
        self.server = creds.server
        try:
            self._http = Connection(
                creds.server, headers=headers, timeout_s=timeout_s, tls=_tls(creds)
            )
        except (ValueError, TransportError) as exc:
            fail(f"server {creds.server}: {exc}", 2)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Decoded JSON (None for 204); ApiError for any error reply; fail() when unreachable.

        A 429 (refused before anything was done) is sent again after the server's Retry-After,
        as is a 503 of a read; within `Patience`, one line on stderr per wait."""
        patience: Patience | None = None
        while True:
            try:
                response = self._http.request(
                    method, path, params=params, json_body=json, timeout_s=timeout_s
                )
            except Timeout:
                fail(f"server {self.server} did not answer in time", EXIT_UNREACHABLE)
            except TransportError as exc:
                fail(f"cannot reach server {self.server}: {exc}", EXIT_UNREACHABLE)
            if response.status < 400:
                break
            error = ApiError(
                response.status,
                problem_detail(response),
                _safe_json(response),
                retry_after_of(response.headers.get("retry-after")),
            )
            if response.status == 429 or (response.status == 503 and method in RESENDABLE):
                patience = patience or Patience()
                if patience.wait(error, f"{method} {path}"):
                    continue
            raise error
        if response.status == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            fail(f"server {self.server} sent a reply that is not JSON ({path})")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def get_all(self, path: str, **params: Any) -> list[dict[str, Any]]:
        """Every item of a listing that comes in pages (`data`, `next_cursor`)."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page = self.get(path, cursor=cursor, **params)
            items += page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.request("POST", path, json=body, params=params)

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, json=body)

    def patch(self, path: str, body: Any = None) -> Any:
        return self.request("PATCH", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def _tls(creds: Credentials) -> ssl.SSLContext | None:
    """The TLS context for an https:// server given a CA file or a client certificate; None
    (the system's CAs, made on first use) otherwise."""
    if not creds.server.startswith("https://") or not (creds.ca_file or creds.client_cert):
        return None
    import ssl

    from protocol.transport import tls_context

    try:
        return tls_context(
            ca_file=creds.ca_file, client_cert=creds.client_cert, client_key=creds.client_key
        )
    except (OSError, ssl.SSLError) as exc:
        fail(f"cannot load the TLS files: {exc}", 2)


def _safe_json(response: Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def report(exc: ApiError, what: str | None = None, *, server: str | None = None) -> NoReturn:
    """Turn an error reply into the one line a person reads, with an exit code per kind."""
    prefix = f"{what}: " if what else ""
    if exc.status == 401:
        login = login_command(server) if server else "fairgpu login"
        fail(f"{prefix}not authenticated: {exc.detail} (run `{login}`)", EXIT_AUTH)
    if exc.status == 403:
        fail(f"{prefix}forbidden: {exc.detail}", EXIT_AUTH)
    if exc.status == 404:
        fail(f"{prefix}{exc.detail}", EXIT_NOT_FOUND)
    fail(f"{prefix}{exc.detail} (HTTP {exc.status})")


def api(server: str | None = None, token: str | None = None) -> Client:
    """A client for the configured server; a clear error when nothing is configured."""
    creds = resolve(server, token)
    if creds is None:
        fail(
            f"no server configured: run `{login_command(None)}` "
            "or set FAIRGPU_SERVER and FAIRGPU_TOKEN",
            2,
        )
    if creds.token is None:
        fail(
            f"not logged in to {creds.server}: run `{login_command(creds.server, creds.insecure)}` "
            "or set FAIRGPU_TOKEN",
            EXIT_AUTH,
        )
    return Client(creds)


@contextmanager
def connect(what: str | None = None) -> Iterator[Client]:
    """The usual shape of a command: a client, and any error reply reported as one line."""
    client = api()
    try:
        yield client
    except ApiError as exc:
        report(exc, what, server=client.server)
    finally:
        client.close()
