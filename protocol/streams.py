"""Terminal streams: the WebSocket frames the CLI, the server and the agent exchange.

Binary frames carry terminal bytes, both ways. Text frames carry one JSON control message:

    CLI -> agent   {"type": "resize", "rows": R, "cols": C}
                   {"type": "signal", "name": "INT"}      (to the terminal's foreground group)
    agent -> CLI   {"type": "exit", "code": N}            (then the stream closes)
    either way     {"type": "eof"}   a forwarded connection's sender shut down its writing half
                                     (port streams, protocol/tcpstream.py)
    server -> CLI  {"type": "error", "message": "..."}    (then the stream closes)

The server relays frame by frame and never holds more than one frame per direction; a frame
over MAX_FRAME_BYTES closes the stream (1009). See docs/INTERACTIVE.md.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_FRAME_BYTES = 256 * 1024
"""The largest frame any side sends or accepts (terminal bytes are sent in smaller reads)."""
ATTACH_PATH = "/v1/jobs/{job}/attach"
AGENT_STREAM_PATH = "/v1/agent/streams/{id}"
FORWARD_PATH = "/v1/jobs/{job}/forward"
SIGNALS = ("INT", "QUIT", "TERM", "HUP", "TSTP", "CONT", "USR1", "USR2", "WINCH")
"""Signals the CLI may send to the terminal's foreground process group."""


class _Control(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resize(_Control):
    type: Literal["resize"]
    rows: Annotated[int, Field(ge=1, le=10_000)]
    cols: Annotated[int, Field(ge=1, le=10_000)]


class Signal(_Control):
    type: Literal["signal"]
    name: Literal["INT", "QUIT", "TERM", "HUP", "TSTP", "CONT", "USR1", "USR2", "WINCH"]


class Exit(_Control):
    type: Literal["exit"]
    code: Annotated[int, Field(ge=0, le=255)]


class Eof(_Control):
    type: Literal["eof"]


class Error(_Control):
    type: Literal["error"]
    message: Annotated[str, Field(max_length=1024)]


Control = Annotated[Resize | Signal | Exit | Eof | Error, Field(discriminator="type")]
_CONTROL: TypeAdapter[Resize | Signal | Exit | Eof | Error] = TypeAdapter(Control)


def parse_control(text: str) -> Resize | Signal | Exit | Eof | Error | None:
    """The control message, or None when the text is not one (it is then ignored)."""
    try:
        return _CONTROL.validate_json(text)
    except (ValidationError, json.JSONDecodeError):
        return None


def control_text(message: Resize | Signal | Exit | Eof | Error) -> str:
    return message.model_dump_json()
