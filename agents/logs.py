"""Ships task logs to the server in bounded chunks.

A chunk stays in flight until a heartbeat reply acknowledges it and is sent again with the same
bounds until then, so the server can recognise duplicates by offset. The node's copy is capped
as it is written (agents.logcap): output dropped before the server had it reaches the server as
a marker that says how many bytes are missing.

Tasks started before the copier existed write one file, `log`, themselves; for those the cap is
enforced here (`enforce_cap`): the front of the log is dropped only once the server has it,
unless the log grows past twice the cap while the server is away.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from agents.state import StateDir, TaskRecord
from protocol.agent import MAX_LOG_CHUNK_CHARS, MAX_LOG_CHUNKS_PER_HEARTBEAT, LogChunk
from protocol.states import TERMINAL_TASK_STATES


def _utf8_boundary(data: bytes) -> int:
    """Length of `data` without a trailing incomplete UTF-8 sequence (kept for the next chunk)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if byte & 0x80 == 0:
            return len(data)
        needed = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4
        return len(data) if back >= needed else len(data) - back
    return len(data)


class LogShipper:
    def __init__(self, state: StateDir, *, max_bytes: int, chunk_bytes: int = MAX_LOG_CHUNK_CHARS):
        self.state = state
        self.max_bytes = max_bytes
        self.chunk_bytes = min(chunk_bytes, MAX_LOG_CHUNK_CHARS)
        self.in_flight: dict[int, list[LogChunk]] = {}

    def chunks(
        self, records: Iterable[TaskRecord], limit: int = MAX_LOG_CHUNKS_PER_HEARTBEAT
    ) -> list[LogChunk]:
        """In-flight chunks first (same bounds as before), then new output, at most `limit`."""
        out: list[LogChunk] = []
        for record in records:
            if len(out) >= limit:
                break
            if record.log_complete:
                continue
            pending = self.in_flight.setdefault(record.task_id, [])
            while len(out) + len(pending) < limit and not (pending and pending[-1].eof):
                chunk = self._next(record, pending)
                if chunk is None:
                    break
                pending.append(chunk)
            out.extend(pending[: limit - len(out)])
        return out

    def _next(self, record: TaskRecord, pending: list[LogChunk]) -> LogChunk | None:
        position = pending[-1].next_offset if pending else record.log_shipped_bytes
        task_id = record.task_id
        ended = record.state in TERMINAL_TASK_STATES
        start, data, at_end = self._read(record, position)
        if start > position:
            dropped = start - position
            marker = f"[fairgpu: {dropped} bytes of log dropped on the node (size cap)]\n"
            return LogChunk(task_id=task_id, offset=position, next_offset=start, data=marker)
        if not ended:
            data = data[: _utf8_boundary(data)]
        if not data and not ended:
            return None
        return LogChunk(
            task_id=task_id,
            offset=position,
            next_offset=position + len(data),
            data=data.decode("utf-8", errors="replace"),
            eof=ended and at_end,
        )

    def _read(self, record: TaskRecord, position: int) -> tuple[int, bytes, bool]:
        """Up to a chunk of the log from `position`, across segments: (start, data, at_end).

        `start` is past `position` when the bytes before it are no longer on the node; `at_end`
        says that nothing follows the data (yet). A segment the copier drops while this reads
        it is read again from the new list.
        """
        for _attempt in range(3):
            segments = self.state.log_segments(record)
            if not segments:
                return position, b"", True
            if position < segments[0][0]:
                return segments[0][0], b"", False
            data = bytearray()
            try:
                for i, (first, path) in enumerate(segments):
                    following = segments[i + 1][0] if i + 1 < len(segments) else None
                    pos = position + len(data)
                    if following is not None and following <= pos:
                        continue
                    if first > pos:  # a gap (a failed write): ship what comes before it first
                        return (position, bytes(data), False) if data else (first, b"", False)
                    with open(path, "rb") as f:
                        f.seek(pos - first)
                        data += f.read(self.chunk_bytes - len(data))
                        at_end = f.read(1) == b""
                    if following is None:
                        return position, bytes(data), at_end
                    if len(data) >= self.chunk_bytes:
                        return position, bytes(data), False
                    if position + len(data) < following:  # this segment ends short of the next
                        return (position, bytes(data), False) if data else (following, b"", False)
            except FileNotFoundError:
                continue
        return position, b"", False

    def acknowledge(self, records: dict[int, TaskRecord], sent: Iterable[LogChunk]) -> None:
        for chunk in sent:
            record = records.get(chunk.task_id)
            pending = self.in_flight.get(chunk.task_id, [])
            if chunk in pending:
                pending.remove(chunk)
            if record is None:
                continue
            record.log_shipped_bytes = max(record.log_shipped_bytes, chunk.next_offset)
            if chunk.eof:
                record.log_complete = True
                self._drop(record)
            self.state.save(record)

    def _drop(self, record: TaskRecord) -> None:
        """The server has the whole log: the node's copy goes at once, not with the record a
        day later (a tenant running many short jobs that each print up to the cap would
        otherwise hold that cap once per job on the node's disk)."""
        for _start, path in self.state.log_segments(record):
            path.unlink(missing_ok=True)
        self.in_flight.pop(record.task_id, None)

    def enforce_cap(self, records: Iterable[TaskRecord]) -> None:
        for record in records:
            if record.state in TERMINAL_TASK_STATES:
                if not record.log_complete:
                    self._trim_ended(record)
                continue
            path = self.state.log_path(record.task_id)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            shipped_all = record.log_shipped_bytes >= record.log_base_bytes + size
            if size > self.max_bytes and (shipped_all or size > 2 * self.max_bytes):
                # The task appends (O_APPEND), so after truncation it writes from 0 again.
                os.truncate(path, 0)
                record.log_base_bytes += size
                self.in_flight.pop(record.task_id, None)
                self.state.save(record)

    def _trim_ended(self, record: TaskRecord) -> None:
        """An ended task's unshipped log beyond the cap keeps only its last `max_bytes`.

        A task that floods its log can end between two checks of the cap with far more than the
        cap on disk; without this it would stay there, and all of it would be shipped. Nothing
        writes to an ended task's log, so it can be rewritten; the tail (how it ended) is kept,
        the server gets the usual marker for the gap.
        """
        path = self.state.log_path(record.task_id)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        unshipped = record.log_base_bytes + size - record.log_shipped_bytes
        if unshipped <= self.max_bytes:
            return
        with path.open("rb") as f:
            f.seek(size - self.max_bytes)
            tail = f.read()
        start = 0
        while start < len(tail) and tail[start] & 0xC0 == 0x80:  # begin on a character
            start += 1
        tail = tail[start:]
        tmp = path.with_name(path.name + ".trim")
        tmp.write_bytes(tail)
        os.replace(tmp, path)
        record.log_base_bytes += size - len(tail)
        self.in_flight.pop(record.task_id, None)
        self.state.save(record)
