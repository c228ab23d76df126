"""A lean asyncpg pool for one-statement requests, and statements compiled once for it.

A quiet heartbeat and a plain submission are most of what a server does: thousands a second
from a thousand nodes, hundreds a second from a busy CLI user. Through SQLAlchemy's session and
pool each costs more CPU than the statement itself, so the direct routes (api/direct.py) run
their statements here, as prepared statements, each in one round trip with no transaction
around it. The statements are SQLAlchemy statements compiled once for asyncpg (`Prepared`), so
their SQL has one source. PostgreSQL only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from scheduler.db.engine import asyncpg_dsn

# SQLSTATE classes of errors that concern the statement alone (data, integrity, syntax and
# access): the connection stays usable. After any other error it is dropped: a server going
# down (57P01) reports an error just before it closes the connection.
STATEMENT_ERROR_CLASSES = frozenset({"22", "23", "42"})
STATEMENT_TIMEOUT_S = 30.0  # connect and statement timeout of the lean pool's connections


_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]


class Prepared:
    """A statement compiled once for asyncpg: `$n` SQL and its parameters' converters."""

    def __init__(self, statement: ClauseElement) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        assert isinstance(compiled, SQLCompiler)
        self.sql = str(compiled)
        self.names: list[str] = list(compiled.positiontup or ())
        self.defaults = dict(compiled.params)  # literal values bound in the statement itself
        self._convert: list[Callable[[Any], Any] | None] = [
            compiled.binds[name].type.bind_processor(_DIALECT) for name in self.names
        ]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        out: list[Any] = []
        for name, convert in zip(self.names, self._convert, strict=True):
            value = params[name] if name in params else self.defaults[name]
            out.append(convert(value) if convert is not None and value is not None else value)
        return out


class LeanPool:
    """Connections for one-statement requests, handed out with no more work than a deque.

    asyncpg's `Pool` costs about 50 µs of CPU per acquire and release (proxies, timeouts, a
    reset), as much as the statement; these statements need none of that: each is a single
    autocommit statement that leaves no session state. Connections open on first use (a
    server starts while its database is away); one that fails or is interrupted is closed and
    replaced later, never reused in an unknown state.
    """

    def __init__(
        self, dsn: str, *, size: int, server_settings: dict[str, str], timeout_s: float
    ) -> None:
        self.dsn = dsn
        self.size = size
        self.server_settings = server_settings
        self.timeout_s = timeout_s
        self._idle: deque[asyncpg.Connection] = deque()
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._open = 0  # connections open or being opened
        self._closed = False

    async def _take(self) -> asyncpg.Connection:
        while True:
            if self._closed:
                raise asyncpg.InterfaceError("the lean pool is closed")
            if self._idle:
                return self._idle.pop()
            if self._open < self.size:
                self._open += 1
                try:
                    conn: asyncpg.Connection = await asyncpg.connect(
                        self.dsn, timeout=self.timeout_s, server_settings=self.server_settings
                    )
                except BaseException:
                    self._open -= 1
                    self._wake(None)
                    raise
                return conn
            waiter: asyncio.Future[asyncpg.Connection | None] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self._give(waiter.result())  # handed over just as we were cancelled
                raise
            if handed is not None:
                return handed
            # None: a connection was dropped, so there is room to open one: loop.

    def _wake(self, conn: asyncpg.Connection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _give(self, conn: asyncpg.Connection) -> None:
        if self._closed or conn.is_closed():
            self._drop(conn)
        elif not self._wake(conn):
            self._idle.append(conn)

    def _drop(self, conn: asyncpg.Connection) -> None:
        self._open -= 1
        conn.terminate()
        self._wake(None)

    async def run(self, method: str, sql: str, *args: Any) -> Any:
        conn = await self._take()
        try:
            result = await getattr(conn, method)(sql, *args, timeout=self.timeout_s)
        except asyncpg.PostgresError as exc:
            if str(exc.sqlstate or "")[:2] in STATEMENT_ERROR_CLASSES:
                self._give(conn)  # the server refused the statement; the connection is fine
            else:
                self._drop(conn)  # shutting down, out of resources...: not to be reused
            raise
        except BaseException:
            self._drop(conn)  # broken or cancelled mid-statement: its state is unknown
            raise
        self._give(conn)
        return result

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            conn = self._idle.pop()
            self._open -= 1
            await conn.close(timeout=self.timeout_s)
        self._wake(None)


def create_pool(database_url: str, *, size: int, idle_in_transaction_timeout_s: float) -> LeanPool:
    timeout_ms = max(1, int(idle_in_transaction_timeout_s * 1000))
    return LeanPool(
        asyncpg_dsn(database_url),
        size=size,
        timeout_s=STATEMENT_TIMEOUT_S,
        server_settings={
            "application_name": "fairgpu-lean",
            "idle_in_transaction_session_timeout": str(timeout_ms),
        },
    )
