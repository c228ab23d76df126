"""How clients reach the server: TLS contexts, and bearer tokens over plain HTTP only to this
machine unless asked."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import ssl


def tls_context(
    *,
    ca_file: Path | str | None = None,
    client_cert: Path | str | None = None,
    client_key: Path | str | None = None,
) -> ssl.SSLContext:
    """Server certificates checked against `ca_file` (else the system's CAs); our own
    certificate presented when the server asks for one (mutual TLS)."""
    import ssl  # only https pays for it: most CLI commands talk to a loopback or https server

    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if client_cert:
        context.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
    return context


def plain_http_refusal(url: str) -> str | None:
    """Why `url` must not carry a token without `--insecure`; None when it may."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return None
    host = parts.hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (
        f"refusing to send credentials over plain http:// to {host or url}: "
        "use https://, or pass --insecure if this network is trusted"
    )
