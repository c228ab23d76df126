"""Parsing what people type: durations (Slurm's and `1h30m`), `-G [TYPE:]N`, `--mem 64G`,
`-S SINCE`, `K=V`.

Every parser raises `typer.BadParameter`, which Typer prints as a usage error (exit 2) without a
traceback, so a bad `-t` never reaches the server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import typer

_UNIT_S = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_UNITS = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_SLURM_DAYS = re.compile(r"^(\d+)-(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_duration(text: str) -> int:
    """Seconds from `1h30m`, `90m`, `45s`, `2d`, or Slurm's `--time` forms.

    Slurm's forms: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`. A bare number is
    minutes, as in Slurm's `--time` (`-t 90` is an hour and a half): a Slurm user typing `-t 60`
    must not get a job killed after one minute. Write `90s` for seconds.
    """
    raw = text.strip().lower()
    if not raw:
        raise typer.BadParameter("empty duration")
    seconds: float | None = None
    if _UNITS.sub("", raw) == "" and _UNITS.search(raw):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _UNITS.findall(raw))
    elif m := _SLURM_DAYS.match(raw):
        d, h, mi, s = (int(x) if x else 0 for x in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    elif re.fullmatch(r"\d+(:\d+){0,2}", raw):
        parts = [int(p) for p in raw.split(":")]
        if len(parts) == 1:
            seconds = parts[0] * 60
        elif len(parts) == 2:
            seconds = parts[0] * 60 + parts[1]
        else:
            seconds = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    if seconds is None:
        raise typer.BadParameter(
            f"bad duration {text!r}: use 1h30m, 90m, 45s, 2d, or Slurm's 2-00:00:00 / HH:MM:SS"
        )
    if seconds <= 0:
        raise typer.BadParameter(f"duration {text!r} must be positive")
    return round(seconds)


_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$")
_MEMORY_UNITS = {"k": 1 << 10, "": 1 << 20, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_MEMORY_BYTES = 1 << 20  # the server's bounds (api/schemas/jobs.py), checked here first
MAX_MEMORY_BYTES = 1 << 46


def parse_memory(text: str) -> int:
    """Bytes from Slurm's `--mem` spelling: `64G`, `512M`, `1.5T`, `800K`, binary units (G =
    GiB); a bare number is MiB, as in Slurm (`--mem 4096` is 4 GiB). `GB`/`GiB` are accepted."""
    m = _MEMORY.match(text.strip().lower())
    if m is None:
        raise typer.BadParameter(f"bad memory size {text!r}: use 64G, 512M, 1T (bare N = MiB)")
    value = round(float(m.group(1)) * _MEMORY_UNITS[m.group(2)])
    if not MIN_MEMORY_BYTES <= value <= MAX_MEMORY_BYTES:
        raise typer.BadParameter(f"memory {text!r} must be between 1M and 64T per node")
    return value


def format_memory(memory_bytes: int) -> str:
    """`64G`, `1536M`: the largest binary unit that divides it, as `--mem` takes it back."""
    for suffix, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if memory_bytes % size == 0:
            return f"{memory_bytes // size}{suffix}"
    return f"{memory_bytes}B"


@dataclass(frozen=True, slots=True)
class GpuRequest:
    gpu_type: str | None
    count: int


def parse_gpus(text: str) -> GpuRequest:
    """`8`, `H100:8`, or Slurm's gres spelling `gpu:H100:8`."""
    parts = text.strip().split(":")
    if parts and parts[0].lower() == "gpu" and len(parts) > 1:
        parts = parts[1:]
    if len(parts) == 1:
        gpu_type, count = None, parts[0]
    elif len(parts) == 2:
        gpu_type, count = parts[0] or None, parts[1]
    else:
        raise typer.BadParameter(f"bad GPU request {text!r}: use N or TYPE:N (e.g. H100:8)")
    if not count.isdigit():
        raise typer.BadParameter(f"bad GPU count in {text!r}: use N or TYPE:N (e.g. H100:8)")
    return GpuRequest(gpu_type=gpu_type, count=int(count))


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A point in time: ISO 8601 (`2026-11-01`, `2026-11-01T08:00`) or a duration ago (`2d`)."""
    now = now or datetime.now(UTC)
    raw = text.strip()
    if raw.lower() == "now":
        return now
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        try:
            return now - timedelta(seconds=parse_duration(raw))
        except typer.BadParameter:
            raise typer.BadParameter(
                f"bad time {text!r}: use an ISO date (2026-11-01) or a duration ago (2d, 12h)"
            ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def parse_env(items: list[str]) -> dict[str, str]:
    """`-e K=V` pairs; `-e K` copies nothing and is refused, so typos show up early."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise typer.BadParameter(f"bad environment variable {item!r}: use NAME=VALUE")
        env[key] = value
    return env


def parse_secret_env(items: list[str]) -> dict[str, str]:
    """`--secret-env NAME=VALUE` or `NAME=@file` (the file's text, less one final newline).

    A refused item is named by its variable, never its value: the message lands in terminals
    and CI logs. `@file` keeps the value out of the shell history and the process list.
    """
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise typer.BadParameter(
                f"bad secret variable {key[:64]!r}: use NAME=VALUE or NAME=@file"
            )
        if value.startswith("@"):
            value = _read_secret_file(key, value[1:])
        env[key] = value
    return env


def _read_secret_file(key: str, path: str) -> str:
    if not path:
        raise typer.BadParameter(f"{key}=@ names no file: use {key}=@path")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {key} from {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    except UnicodeDecodeError:
        raise typer.BadParameter(f"cannot read {key} from {path}: not UTF-8 text") from None
    return text.removesuffix("\n").removesuffix("\r")
