"""Input types shared by the API schemas: names, durations, GPU types, with their limits.

Every limit lives here so that the API, its docs and its tests agree on one number.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_NAME_CHARS = 128
MAX_ORG_NAME_CHARS = 63
MAX_USER_NAME_CHARS = 64
MAX_REASON_CHARS = 1024
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 100

# Printable: no control characters (C0, DEL, C1) and no line or paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_IDENT = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_DURATION_UNITS_S = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_DURATION_PARTS = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_CLOCK = re.compile(r"^(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?$")


def _printable(value: Any) -> Any:
    if isinstance(value, str) and _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def parse_duration_s(value: Any) -> int:
    """Seconds from an integer, `1h30m` / `90m` / `2d` / `45s`, or `[D-]HH:MM[:SS]`.

    A bare number in a string is refused: Slurm reads `90` as minutes, other tools as seconds,
    and a job killed after 90 seconds instead of 90 minutes is an expensive misunderstanding.
    """
    if isinstance(value, bool):
        raise ValueError("expected seconds (integer) or a duration such as '1h30m'")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("seconds must be a whole number")
        return int(value)
    if not isinstance(value, str):
        raise ValueError("expected seconds (integer) or a duration such as '1h30m'")
    raw = value.strip().lower()
    if len(raw) > 32:
        raise ValueError("duration too long")
    if raw and _DURATION_PARTS.sub("", raw) == "" and _DURATION_PARTS.search(raw):
        total = sum(float(n) * _DURATION_UNITS_S[u] for n, u in _DURATION_PARTS.findall(raw))
        return round(total)
    if m := _CLOCK.match(raw):
        days, first, second, third = m.groups()
        if third is None:  # HH:MM
            h, mi, s = int(first), int(second), 0
        else:
            h, mi, s = int(first), int(second), int(third)
        return ((int(days or 0) * 24 + h) * 60 + mi) * 60 + s
    raise ValueError(
        f"bad duration {value!r}: send seconds as an integer, or '1h30m', '90m', '2d', 'HH:MM:SS'"
    )


Printable = BeforeValidator(_printable)

Name = Annotated[
    str,
    BeforeValidator(_strip),
    Printable,
    Field(min_length=1, max_length=MAX_NAME_CHARS),
]
Reason = Annotated[str, Printable, Field(max_length=MAX_REASON_CHARS)]
OrgName = Annotated[
    str, Field(min_length=1, max_length=MAX_ORG_NAME_CHARS, pattern=_IDENT, examples=["acme"])
]
UserName = Annotated[
    str, Field(min_length=1, max_length=MAX_USER_NAME_CHARS, pattern=_IDENT, examples=["ada"])
]
GpuType = Annotated[
    str, Field(min_length=1, max_length=64, pattern=_IDENT, examples=["H100", "A100-80GB"])
]
SiteName = Annotated[str, Field(min_length=1, max_length=63, pattern=_IDENT)]
DurationS = Annotated[
    int,
    BeforeValidator(parse_duration_s),
    Field(gt=0, description="Seconds, or a string such as '1h30m' / '2d' / 'HH:MM:SS'."),
]


class InputModel(BaseModel):
    """Request bodies: unknown fields are an error, so that a typo is loud."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN is not JSON


class OutputModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)
