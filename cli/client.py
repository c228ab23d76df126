"""The CLI's HTTP client: every failure becomes one line on stderr and a non-zero exit.

Commands call `api()` for a client bound to the configured server and token, and its `get`,
`post`, `put`, `patch`, `delete` return decoded JSON. Problem JSON (RFC 9457), connection errors,
timeouts and 401s are turned into `fairgpu: error: ...` by `fail`, never a traceback. The
transport is swappable (httpx's seam) so that tests can point the CLI at an in-process app.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import httpx

from cli.common import fail
from cli.config import Credentials, resolve
from protocol.transport import plain_http_refusal

# Tests set this to route every request to an app in the same process.
transport_override: httpx.BaseTransport | None = None

DEFAULT_TIMEOUT_S = 30.0
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_NOT_FOUND = 5


class ApiError(Exception):
    """The server answered with an error; `detail` is the problem's human sentence."""

    def __init__(self, status: int, detail: str, body: Any = None) -> None:
        super().__init__(f"{detail} (HTTP {status})")
        self.status = status
        self.detail = detail
        self.body = body


def problem_detail(response: httpx.Response) -> str:
    """The sentence a person needs from an error reply, whatever shape the body has."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip().splitlines()
        return text[0][:300] if text else response.reason_phrase
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("title")
        if isinstance(detail, list):  # FastAPI's own validation shape, should a route skip ours
            return "; ".join(str(d.get("msg", d)) for d in detail if isinstance(d, dict))[:300]
        if detail:
            return str(detail).splitlines()[0][:300]
    return response.reason_phrase


class Client:
    def __init__(
        self,
        creds: Credentials,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        refusal = plain_http_refusal(creds.server)
        if refusal and not creds.insecure:
            fail(refusal, 2)
        headers = {"User-Agent": "fairgpu-cli"}
        if creds.token:
            headers["Authorization"] = f"Bearer {creds.token}"
        self.server = creds.server
        self._http = httpx.Client(
            base_url=creds.server,
            headers=headers,
            timeout=timeout_s,
            transport=transport or transport_override,
        )

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
        """Decoded JSON (None for 204); ApiError for any error reply; fail() when unreachable."""
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(
                method,
                path,
                params=clean or None,
                json=json,
                timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException:
            fail(f"server {self.server} did not answer in time", EXIT_UNREACHABLE)
        except httpx.HTTPError as exc:
            reason = str(exc).split("\n")[0] or type(exc).__name__
            fail(f"cannot reach server {self.server}: {reason}", EXIT_UNREACHABLE)
        if response.status_code >= 400:
            raise ApiError(response.status_code, problem_detail(response), _safe_json(response))
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            fail(f"server {self.server} sent a reply that is not JSON ({path})")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.request("POST", path, json=body, params=params)

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, json=body)

    def patch(self, path: str, body: Any = None) -> Any:
        return self.request("PATCH", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def _safe_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def report(exc: ApiError, what: str | None = None) -> NoReturn:
    """Turn an error reply into the one line a person reads, with an exit code per kind."""
    prefix = f"{what}: " if what else ""
    if exc.status == 401:
        fail(f"{prefix}not authenticated: {exc.detail} (run `fairgpu login`)", EXIT_AUTH)
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
            "no server configured: run `fairgpu login --server URL --token TOKEN` "
            "or set FAIRGPU_SERVER and FAIRGPU_TOKEN",
            2,
        )
    return Client(creds)


@contextmanager
def connect(what: str | None = None) -> Iterator[Client]:
    """The usual shape of a command: a client, and any error reply reported as one line."""
    client = api()
    try:
        yield client
    except ApiError as exc:
        report(exc, what)
    finally:
        client.close()
