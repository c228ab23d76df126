"""Where the CLI finds its server and token: a 0600 file, overridden by FAIRGPU_SERVER/TOKEN."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import typer

CONFIG_FILE = "config.json"


@dataclass(frozen=True, slots=True)
class Credentials:
    server: str
    token: str | None
    insecure: bool = False
    """Plain http:// to another machine was asked for (`--insecure`, FAIRGPU_INSECURE=1)."""
    ca_file: str | None = None
    """CA certificates that sign the server's (else the system's CAs)."""
    client_cert: str | None = None
    client_key: str | None = None
    """Our certificate and key, for a server that asks for them (mutual TLS)."""


TLS_FILES = ("ca_file", "client_cert", "client_key")


def login_command(server: str | None, insecure: bool = False) -> str:
    """What a person runs to log in (it asks for the token, which stays out of shell history)."""
    return f"fairgpu login --server {server or 'URL'}" + (" --insecure" if insecure else "")


def config_dir() -> Path:
    """`FAIRGPU_CONFIG_DIR` (tests, several identities) or the platform's per-user config dir."""
    override = os.environ.get("FAIRGPU_CONFIG_DIR")
    if override:
        return Path(override)
    return Path(typer.get_app_dir("fairgpu"))


def config_path() -> Path:
    return config_dir() / CONFIG_FILE


def read_config() -> dict[str, str]:
    """What `fairgpu login` saved; an unreadable or foreign file reads as empty."""
    try:
        data = json.loads(config_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items() if isinstance(v, str)}


def write_config(
    server: str, token: str, *, insecure: bool = False, tls_files: dict[str, str] | None = None
) -> Path:
    """Write the file with mode 0600 from the start: a token must never be world-readable.

    `tls_files` maps names of TLS_FILES to paths, saved as absolute paths."""
    directory = config_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
    saved = {"server": server.rstrip("/"), "token": token}
    if insecure:
        saved["insecure"] = "true"
    for name, file in (tls_files or {}).items():
        saved[name] = str(Path(file).expanduser().resolve())
    body = json.dumps(saved, indent=2) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(body)
    path.chmod(0o600)  # an existing file keeps its old mode through O_CREAT: fix it
    return path


def resolve(server: str | None = None, token: str | None = None) -> Credentials | None:
    """Explicit values, then FAIRGPU_SERVER / FAIRGPU_TOKEN (and FAIRGPU_CA_FILE,
    FAIRGPU_CLIENT_CERT, FAIRGPU_CLIENT_KEY), then the config file."""
    saved = read_config()
    url = server or os.environ.get("FAIRGPU_SERVER") or saved.get("server")
    secret = token or os.environ.get("FAIRGPU_TOKEN") or saved.get("token")
    if not url:
        return None
    insecure = os.environ.get("FAIRGPU_INSECURE", saved.get("insecure", "")).lower()
    tls = {name: os.environ.get(f"FAIRGPU_{name.upper()}") or saved.get(name) for name in TLS_FILES}
    return Credentials(
        server=url.rstrip("/"),
        token=secret or None,
        insecure=insecure in ("1", "true", "yes"),
        **{name: file or None for name, file in tls.items()},
    )
