"""The CLI's side of a terminal stream: this terminal joined to a job's (docs/INTERACTIVE.md).

A WebSocket to `GET /v1/jobs/{job}/attach` (websockets' sync client): binary frames are terminal
bytes both ways, text frames control messages (protocol/streams.py). On a real terminal it
switches to raw mode, so Ctrl-C and every other key reach the remote program as bytes, and sends
the window size at start and on every SIGWINCH. `Ctrl-]` then `d` detaches, leaving the job
running. Without a terminal (a pipe, a test) it changes no modes and still relays; SIGINT then
becomes a signal message to the remote foreground process group.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import sys
import termios
import threading
import tty
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cli.client import ApiError, retry_after_of
from cli.common import fail
from protocol.streams import ATTACH_PATH, MAX_FRAME_BYTES

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

    from cli.config import Credentials

ESCAPE = 0x1D  # Ctrl-]
DETACH = b"d"
EXIT_STREAM_ERROR = 255
"""Like ssh: the stream failed (the remote program's own status is never 255 here)."""
ESCAPE_HELP = "Ctrl-] then d detaches (the job keeps running)"


@dataclass
class Outcome:
    code: int | None = None
    """The remote program's exit status; None: detached or failed."""
    error: str | None = None
    detached: bool = False


def attach_url(server: str, job: str, rank: int, *, new: bool = False) -> str:
    base = server.rstrip("/")
    scheme, _, rest = base.partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    query = f"rank={rank}&new=true" if new else f"rank={rank}"
    return f"{ws_scheme}://{rest}{ATTACH_PATH.format(job=job)}?{query}"


def open_stream(creds: Credentials, job: str, rank: int, *, new: bool = False) -> ClientConnection:
    """The WebSocket (`new`: to a new shell in the task's sandbox); ApiError for the server's
    refusal (404, 403, 409...)."""
    from websockets.exceptions import InvalidHandshake, InvalidStatus
    from websockets.sync.client import connect

    from cli.client import _tls

    url = attach_url(creds.server, job, rank, new=new)
    tls = _tls(creds) if url.startswith("wss:") else None
    try:
        return connect(
            url,
            additional_headers={"Authorization": f"Bearer {creds.token}"},
            user_agent_header="fairgpu-cli",
            max_size=MAX_FRAME_BYTES,
            compression=None,
            open_timeout=30,
            ssl=tls,
        )
    except InvalidStatus as exc:
        response = exc.response
        try:
            body: Any = json.loads(response.body or b"")
            detail = str(body.get("detail") or body.get("title"))
        except (ValueError, AttributeError):
            body, detail = None, response.reason_phrase
        retry_after = retry_after_of(response.headers.get("Retry-After"))
        raise ApiError(response.status_code, detail, body, retry_after) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        fail(f"cannot open a terminal stream to {creds.server}: {exc}", EXIT_STREAM_ERROR)


def window_size(fd: int) -> tuple[int, int] | None:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


class Session:
    """Relays until the remote program exits, the user detaches or the stream fails."""

    def __init__(self, websocket: ClientConnection, *, stdin: int = 0, stdout: int = 1) -> None:
        self.websocket = websocket
        self.stdin = stdin
        self.stdout = stdout
        self.tty = os.isatty(stdin)
        self.outcome = Outcome()
        self._wake_r, self._wake_w = os.pipe()
        self._pending: list[str] = []  # control messages the input thread sends
        self._lock = threading.Lock()

    def run(self) -> Outcome:
        saved = termios.tcgetattr(self.stdin) if self.tty else None
        handlers = self._install_signals()
        try:
            if saved is not None:
                tty.setraw(self.stdin)
            self._first_size()
            sender = threading.Thread(target=self._send_input, daemon=True)
            sender.start()
            self._receive()
        finally:
            if saved is not None:
                termios.tcsetattr(self.stdin, termios.TCSADRAIN, saved)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            with contextlib.suppress(Exception):
                self.websocket.close()
            os.close(self._wake_w)
        return self.outcome

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        handlers: dict[int, Any] = {signal.SIGWINCH: signal.getsignal(signal.SIGWINCH)}
        signal.signal(signal.SIGWINCH, lambda _s, _f: self._queue_resize())
        if not self.tty:  # raw mode sends Ctrl-C as a byte; a pipe has no Ctrl-C key
            handlers[signal.SIGINT] = signal.getsignal(signal.SIGINT)
            signal.signal(
                signal.SIGINT, lambda _s, _f: self._queue({"type": "signal", "name": "INT"})
            )
        return handlers

    def _queue_resize(self) -> None:
        size = window_size(self.stdin) if self.tty else None
        if size is not None:
            self._queue({"type": "resize", "rows": size[0], "cols": size[1]})

    def _first_size(self) -> None:
        """The remote command starts on the first frame (agents/ptyhost.py): the window's size,
        or without a terminal $LINES x $COLUMNS (24x80 when unset)."""
        size = window_size(self.stdin) if self.tty else None
        rows, cols = size or (_env_int("LINES", 24), _env_int("COLUMNS", 80))
        self._queue({"type": "resize", "rows": rows, "cols": cols})

    def _queue(self, message: dict[str, Any]) -> None:
        """From a signal handler: the input thread sends it (never send from a handler, which
        may have interrupted a send holding the connection's lock)."""
        with self._lock:
            self._pending.append(json.dumps(message))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _send_input(self) -> None:
        from websockets.exceptions import ConnectionClosed

        escaped = False
        reading = True
        try:
            while True:
                watched = [self._wake_r, self.stdin] if reading else [self._wake_r]
                ready, _, _ = select.select(watched, [], [])
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                    with self._lock:
                        pending, self._pending = self._pending, []
                    for text in pending:
                        self.websocket.send(text)
                if self.stdin not in ready:
                    continue
                data = os.read(self.stdin, 64 * 1024)
                if not data:
                    reading = False  # end of input: keep showing the output
                    continue
                if escaped or ESCAPE in data:
                    data, escaped, detach = _escape(data, escaped)
                    if detach:
                        if data:
                            self.websocket.send(data)
                        self.outcome.detached = True
                        self.websocket.close()
                        return
                if data:
                    self.websocket.send(data)
        except (ConnectionClosed, OSError):
            return

    def _receive(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for message in self.websocket:
                if isinstance(message, bytes):
                    _write_all(self.stdout, message)
                    continue
                try:
                    control = json.loads(message)
                except ValueError:
                    continue
                if control.get("type") == "exit":
                    self.outcome.code = int(control.get("code", 0))
                    return
                if control.get("type") == "error":
                    self.outcome.error = str(control.get("message", "the stream failed"))
                    return
        except ConnectionClosed:
            pass
        if not self.outcome.detached and self.outcome.code is None and self.outcome.error is None:
            self.outcome.error = "the connection to the server was lost"


def _escape(data: bytes, escaped: bool) -> tuple[bytes, bool, bool]:
    """(bytes to send, an escape is pending, detach now) for `Ctrl-]` then `d`."""
    out = bytearray()
    for byte in data:
        if escaped:
            escaped = False
            if bytes([byte]) == DETACH:
                return bytes(out), False, True
            out += bytes([ESCAPE, byte])
        elif byte == ESCAPE:
            escaped = True
        else:
            out.append(byte)
    return bytes(out), escaped, False


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, min(10_000, int(os.environ.get(name, ""))))
    except ValueError:
        return default


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def relay(websocket: ClientConnection, job: str, *, new: bool = False) -> int:
    """Relay until the end; the exit status for the CLI: the remote program's, 0 when detached
    (`new`: a new shell, which ends with this connection)."""
    if os.isatty(0):
        help_line = "Ctrl-] then d leaves and ends this shell" if new else ESCAPE_HELP
        sys.stderr.write(f"fairgpu: attached to job {job} ({help_line})\r\n")
    with websocket:  # websockets wants its connections used as context managers
        outcome = Session(websocket).run()
    if outcome.detached:
        if new:
            sys.stderr.write(f"fairgpu: left the new shell in job {job}; it ends\n")
        else:
            sys.stderr.write(f"fairgpu: detached; `fairgpu attach {job}` returns to it\n")
        return 0
    if outcome.error is not None:
        fail(outcome.error, EXIT_STREAM_ERROR)
    return outcome.code if outcome.code is not None else EXIT_STREAM_ERROR
