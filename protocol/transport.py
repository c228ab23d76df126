"""Bearer tokens cross plain HTTP in clear: allowed to this machine, elsewhere only if asked."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


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
