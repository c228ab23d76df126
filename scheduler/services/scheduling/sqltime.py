"""Timestamps as epoch numbers computed by the database, for reads of thousands of rows.

The core wants float epoch seconds. Reading a `UTCDateTime` column costs a `datetime` per row
(built by the driver, fixed up by the type decorator) and then `.timestamp()`: at 20,000 pending
jobs and 8,000 open allocations that was a good part of a cycle's load, all on the event loop.
These expressions make the database return the number itself.

Both give exactly what `datetime.timestamp()` gives for the stored value: the database computes
whole microseconds (an integer, exact), and the division by 10^6 is one correctly rounded IEEE
division, as CPython's `timestamp()` is.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Float
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement


class epoch_us(FunctionElement[int]):
    """Whole microseconds since the epoch of a `UTCDateTime` column (NULL stays NULL)."""

    type = BigInteger()
    inherit_cache = True
    name = "epoch_us"


class epoch_s(FunctionElement[float]):
    """Float seconds since the epoch, equal to `datetime.timestamp()` of the stored value."""

    type = Float()
    inherit_cache = True
    name = "epoch_s"


def _arg(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> str:
    (column,) = element.clauses
    assert isinstance(column, ColumnElement)
    return compiler.process(column, **kw)


@compiles(epoch_us, "postgresql")
def _epoch_us_pg(element: epoch_us, compiler: SQLCompiler, **kw: Any) -> str:
    # EXTRACT gives an exact NUMERIC on PostgreSQL 14+ (a double before: still exact to the µs
    # after rounding, as epochs in µs are far below 2^53).
    return f"CAST(round(EXTRACT(EPOCH FROM {_arg(element, compiler, **kw)}) * 1000000) AS BIGINT)"


@compiles(epoch_us, "sqlite")
def _epoch_us_sqlite(element: epoch_us, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLAlchemy stores 'YYYY-MM-DD HH:MM:SS.ffffff'; the fraction is padded so that a value
    # written without one (or with fewer digits) still reads right.
    arg = _arg(element, compiler, **kw)
    return (
        f"(CAST(strftime('%s', substr({arg}, 1, 19)) AS INTEGER) * 1000000"
        f" + CAST(substr({arg} || '000000', 21, 6) AS INTEGER))"
    )


@compiles(epoch_s, "postgresql")
def _epoch_s_pg(element: epoch_s, compiler: SQLCompiler, **kw: Any) -> str:
    us = _epoch_us_pg(epoch_us(*element.clauses), compiler, **kw)
    return f"(CAST({us} AS DOUBLE PRECISION) / CAST(1000000 AS DOUBLE PRECISION))"


@compiles(epoch_s, "sqlite")
def _epoch_s_sqlite(element: epoch_s, compiler: SQLCompiler, **kw: Any) -> str:
    return f"({_epoch_us_sqlite(epoch_us(*element.clauses), compiler, **kw)} / 1000000.0)"
