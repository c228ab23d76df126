"""Copies a task's output into its log on the node, keeping only the last `max_bytes` of it.

The task's launch wrapper (agents.runner) starts this as `python -I -S logcap.py DIR MAX_BYTES
RATE_BYTES_PER_S` with the read end of the task's output pipe on stdin and, on fd 3, a lock the
agent took for it: the lock is released when this process exits, which is how the agent knows that
every byte the task wrote is on disk. It runs in the task's session but in a process group of its
own, ignoring SIGTERM, SIGINT and SIGHUP, so that what a task prints while it shuts down (after
SIGTERM, or up to SIGKILL) is still captured; it exits when its input ends, that is when every
writer (the task, its children, the wrapper) is gone. It is not the agent's child: an agent that
restarts or dies loses nothing and never makes the task write to a pipe without a reader.

The log is a series of segments `log.<offset>` named by the offset, in the task's whole output,
of their first byte. At most two are kept, each up to half the cap: the node's disk holds at most
`max_bytes`, always the latest output, and the reader (agents.logs) knows from the first
segment's name how many bytes were dropped before it. Segments start on a UTF-8 character, so
the kept tail never starts in the middle of one. A write that fails (a full disk) drops that
output and is retried a second later in a new segment, leaving a gap the reader reports.

Only the standard library: it runs with `-I -S`, untouched by the job's environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import time
from collections import deque

READ_BYTES = 64 * 1024
PIPE_BYTES = 1024 * 1024
"""The pipe's buffer (Linux lets an unprivileged process ask for up to 1 MiB): bursts of output
do not wait for this process to be scheduled."""
SEGMENT_PREFIX = "log."
KEPT_SEGMENTS = 2
RETRY_AFTER_FAILURE_S = 1.0
BURST_S = 4
PAUSE_S = 0.05
_LONGEST_CHAR_TAIL = 3  # continuation bytes after a UTF-8 lead byte, at most


def segment_name(start: int) -> str:
    return f"{SEGMENT_PREFIX}{start:020d}"  # zero-padded: `cat log.*` reads them in order


def list_segments(directory: str) -> list[tuple[int, str]]:
    """(offset of the first byte, path) of the log segments in `directory`, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        digits = name[len(SEGMENT_PREFIX) :]
        if name.startswith(SEGMENT_PREFIX) and digits.isdigit():
            found.append((int(digits), os.path.join(directory, name)))
    found.sort()
    return found


def _continuation_run(data: bytes | memoryview, pos: int) -> int:
    """How many UTF-8 continuation bytes (at most 3) start at `pos`: they end a character."""
    run = 0
    while run < _LONGEST_CHAR_TAIL and pos + run < len(data) and data[pos + run] & 0xC0 == 0x80:
        run += 1
    return run


class SegmentedLog:
    """The bounded log: `write` appends, rotating segments so that at most the cap is kept."""

    def __init__(self, directory: str, max_bytes: int) -> None:
        self.directory = directory
        # A segment may end up to 3 bytes long (a character is never split across two).
        self.segment_bytes = max(max_bytes // KEPT_SEGMENTS - _LONGEST_CHAR_TAIL, 1)
        self.offset = 0  # bytes of output consumed so far, written or dropped
        self.size = 0  # bytes in the current segment
        self.fd: int | None = None
        self.kept: deque[str] = deque()
        self.retry_at = 0.0
        self._open()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self.fd is not None and self.size >= self.segment_bytes:
                run = _continuation_run(view, pos)  # finish the character first
                if run:
                    self._append(view[pos : pos + run])
                    pos += run
                    continue
                self._open()
            elif self.fd is None and time.monotonic() >= self.retry_at:
                self._open()
            if self.fd is None:
                self.offset += len(view) - pos  # failing disk: this output is lost
                return
            end = min(len(view), pos + self.segment_bytes - self.size)
            self._append(view[pos:end])
            pos = end

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _append(self, data: memoryview) -> None:
        assert self.fd is not None
        try:
            while data:
                written = os.write(self.fd, data)
                self.size += written
                self.offset += written
                data = data[written:]
        except OSError:
            self.offset += len(data)
            self._fail()

    def _open(self) -> None:
        self.close()
        path = os.path.join(self.directory, segment_name(self.offset))
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        except OSError:
            self._fail()
            return
        self.size = 0
        self.kept.append(path)
        while len(self.kept) > KEPT_SEGMENTS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.kept.popleft())

    def _fail(self) -> None:
        self.close()
        self.retry_at = time.monotonic() + RETRY_AFTER_FAILURE_S


def copy(source: int, log: SegmentedLog, *, rate_bytes_per_s: int = 0) -> None:
    """Until `source` ends (every writer gone) or fails.

    Above `rate_bytes_per_s` (0: no limit), after a burst of `BURST_S` seconds' worth, it reads
    no faster: the pipe fills and the task's writes wait. That bounds what a flooding task costs
    the node (this process's CPU and the disk's page cache) well below a core.
    """
    burst = float(rate_bytes_per_s * BURST_S)
    allowance = burst
    last = time.monotonic()
    while True:
        try:
            data = os.read(source, READ_BYTES)
        except OSError:
            return
        if not data:
            return
        log.write(data)
        if rate_bytes_per_s:
            now = time.monotonic()
            allowance = min(burst, allowance + (now - last) * rate_bytes_per_s) - len(data)
            last = now
            if allowance < -rate_bytes_per_s * PAUSE_S:  # few long pauses, not many short ones
                time.sleep(-allowance / rate_bytes_per_s)


def main(argv: list[str]) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the wrapper already set this; make sure
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # out of the task's group: killing the task leaves the copy running
    if len(argv) != 4 or not (argv[2].isdigit() and argv[3].isdigit()):
        print("usage: logcap.py DIRECTORY MAX_BYTES RATE_BYTES_PER_S < output", file=sys.stderr)
        return 2
    set_pipe_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux
    if set_pipe_size is not None:
        # Not a pipe, or a lower system limit: the default buffer works too.
        with contextlib.suppress(OSError):
            fcntl.fcntl(0, set_pipe_size, PIPE_BYTES)
    log = SegmentedLog(argv[1], int(argv[2]))
    try:
        copy(0, log, rate_bytes_per_s=int(argv[3]))
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
