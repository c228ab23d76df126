"""The CLI's HTTP/1.1 connection, on the standard library: a user command pays for no HTTP
package at start-up (importing httpx is a third of `fairgpu submit`'s wall time).

One keep-alive connection per command; TLS with the caller's context; a proxy from
`https_proxy` / `http_proxy` / `no_proxy` (either case), as curl and httpx read them. A GET
whose reused connection the server had already closed is sent again once on a new one; any
other request is never sent twice, so a submission cannot be made twice by the client.
"""

from __future__ import annotations

import http.client
import json
import os
import select
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlencode, urlsplit

if TYPE_CHECKING:
    import ssl

RESENDABLE = frozenset({"GET", "HEAD"})


class TransportError(Exception):
    """No reply came: the server is unreachable, refused TLS, or dropped the connection."""


class Timeout(TransportError):
    """The server did not answer within the timeout."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    content: bytes
    headers: dict[str, str] = field(default_factory=dict)
    """Header names in lower case."""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The decoded body; ValueError when it is not JSON."""
        return json.loads(self.content)


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: str | None = None


def _env(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name.lower()) or environ.get(name.upper()) or ""


def bypasses_proxy(host: str, port: int, no_proxy: str) -> bool:
    """Whether `no_proxy` (comma-separated: `*`, hosts, `.domains`, `host:port`, CIDRs) names
    this host."""
    import ipaddress

    host = host.lower().strip("[]")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.strip("[]").lstrip(".")
        if host == name or host.endswith("." + name):
            return True
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(name, strict=False):
                return True
        except ValueError:
            continue
    return False


def proxy_for(url: str, environ: Mapping[str, str] = os.environ) -> Proxy | None:
    """The proxy the environment names for `url`, or None to connect directly."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    raw = _env(environ, f"{parts.scheme}_proxy") or _env(environ, "all_proxy")
    if not raw or bypasses_proxy(parts.hostname or "", port, _env(environ, "no_proxy")):
        return None
    proxy = urlsplit(raw if "://" in raw else f"http://{raw}")
    if proxy.scheme != "http" or not proxy.hostname:
        raise TransportError(f"proxy {raw!r}: only http:// proxies are supported")
    authorization = None
    if proxy.username is not None:
        import base64

        pair = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    return Proxy(proxy.hostname, proxy.port or 80, authorization)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Connection:
    """Requests to one server (`base_url` may carry a path prefix) over one reused socket."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        tls: ssl.SSLContext | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {base_url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self._prefix = parts.path.rstrip("/")
        self._headers = dict(headers or {})
        self._timeout_s = timeout_s
        self._tls = tls
        self._proxy = proxy_for(base_url, environ)
        self._conn: http.client.HTTPConnection | None = None
        self._answered = 0  # replies on the current socket: the server may close it when idle

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._answered = 0

    def _open(self) -> http.client.HTTPConnection:
        host, port = (
            (self._proxy.host, self._proxy.port) if self._proxy else (self._host, self._port)
        )
        if not self._https:
            return http.client.HTTPConnection(host, port, timeout=self._timeout_s)
        if self._tls is None:
            from protocol.transport import tls_context

            self._tls = tls_context()
        conn = http.client.HTTPSConnection(host, port, timeout=self._timeout_s, context=self._tls)
        if self._proxy:
            auth = self._proxy.authorization
            conn.set_tunnel(self._host, self._port, {"Proxy-Authorization": auth} if auth else None)
        return conn

    def _connection(self) -> http.client.HTTPConnection:
        """The open connection, unless the server closed it while we were idle (a closed
        socket reads as ready): then a new one, before anything is sent on the dead one."""
        sock = self._conn.sock if self._conn is not None else None
        if sock is not None and select.select([sock], [], [], 0)[0]:
            self.close()
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _target(self, path: str, params: Mapping[str, Any] | None) -> str:
        query = {
            key: [_query_value(v) for v in value] if isinstance(value, list | tuple) else
            _query_value(value)
            for key, value in (params or {}).items()
            if value is not None
        }  # fmt: skip
        target = self._prefix + path + (f"?{urlencode(query, doseq=True)}" if query else "")
        # A plain-http proxy is sent the whole URL; through a CONNECT tunnel only the path.
        return self._origin + target if self._proxy and not self._https else target

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        timeout_s: float | None = None,
    ) -> Response:
        """The server's reply, whatever its status; TransportError when none came."""
        target = self._target(path, params)
        headers = dict(self._headers)
        payload = None
        if json_body is not None:
            payload = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        if self._proxy and not self._https:
            headers["Host"] = self._origin.split("://", 1)[1]
            if self._proxy.authorization:
                headers["Proxy-Authorization"] = self._proxy.authorization
        timeout = self._timeout_s if timeout_s is None else timeout_s
        while True:
            conn = self._connection()
            reused = self._answered > 0
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, target, body=payload, headers=headers)
                reply = conn.getresponse()
                content = reply.read()
            except TimeoutError as exc:
                self.close()
                raise Timeout(f"no answer in {timeout:g} s") from exc
            except (ConnectionResetError, BrokenPipeError) as exc:
                # Includes http.client.RemoteDisconnected: closed before any reply.
                self.close()
                if reused and method in RESENDABLE:
                    continue  # the new connection has answered nothing yet: at most once
                raise TransportError(f"connection closed: {_reason(exc)}") from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise TransportError(_reason(exc)) from exc
            self._answered += 1
            if reply.will_close:
                self.close()
            return Response(
                status=reply.status,
                reason=reply.reason,
                content=content,
                headers={k.lower(): v for k, v in reply.getheaders()},
            )


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as the server's schemas read booleans
    return str(value)
