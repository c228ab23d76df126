"""Log shipping: bounded chunks, identical resends, UTF-8 boundaries, the size cap."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.logcap import list_segments, segment_name
from agents.logs import LogShipper, _utf8_boundary
from agents.state import StateDir, TaskRecord
from tests.agents.helpers import spec


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    return StateDir(tmp_path / "state")


def record_with_log(state: StateDir, data: bytes, task_id: int = 1) -> TaskRecord:
    record = TaskRecord(spec=spec(task_id), state="running")
    state.save(record)
    state.log_path(task_id).write_bytes(data)
    return record


def test_chunks_are_bounded_and_resent_identically_until_acknowledged(state: StateDir) -> None:
    record = record_with_log(state, b"a" * 25)
    shipper = LogShipper(state, max_bytes=1000, chunk_bytes=10)
    first = shipper.chunks([record], limit=2)
    assert [(c.offset, c.next_offset) for c in first] == [(0, 10), (10, 20)]
    with state.log_path(1).open("ab") as f:
        f.write(b"b" * 10)
    again = shipper.chunks([record], limit=3)
    assert again[:2] == first  # not acknowledged: same bounds
    assert (again[2].offset, again[2].next_offset) == (20, 30)
    shipper.acknowledge({1: record}, again)
    assert record.log_shipped_bytes == 30
    rest = shipper.chunks([record], limit=5)
    assert [(c.offset, c.next_offset, c.data, c.eof) for c in rest] == [(30, 35, "bbbbb", False)]


def test_an_ended_task_gets_an_eof_chunk_then_nothing(state: StateDir) -> None:
    record = record_with_log(state, b"done\n")
    record.state = "exited"
    shipper = LogShipper(state, max_bytes=1000)
    chunks = shipper.chunks([record])
    assert [(c.data, c.eof) for c in chunks] == [("done\n", True)]
    assert state.read_log(record) == b"done\n"
    shipper.acknowledge({1: record}, chunks)
    assert record.log_complete
    assert shipper.chunks([record]) == []
    assert state.read_log(record) == b""  # the server has it: nothing stays on the node


def test_a_split_multibyte_character_waits_for_its_end(state: StateDir) -> None:
    euro = "€".encode()
    record = record_with_log(state, b"x" + euro[:2])
    shipper = LogShipper(state, max_bytes=1000)
    chunks = shipper.chunks([record])
    assert [c.data for c in chunks] == ["x"]
    shipper.acknowledge({1: record}, chunks)
    with state.log_path(1).open("ab") as f:
        f.write(euro[2:])
    assert [c.data for c in shipper.chunks([record])] == ["€"]


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40), st.integers(min_value=0, max_value=200))
def test_utf8_boundary_never_splits_a_character(text: str, cut: int) -> None:
    data = text.encode()[:cut]
    kept = data[: _utf8_boundary(data)]
    kept.decode()  # raises if a character was split
    assert len(data) - len(kept) <= 3


def test_cap_drops_shipped_output_and_continues_offsets(state: StateDir) -> None:
    record = record_with_log(state, b"x" * 150)
    shipper = LogShipper(state, max_bytes=100)
    shipper.enforce_cap([record])
    assert state.log_path(1).stat().st_size == 150  # not shipped yet, under twice the cap
    shipper.acknowledge({1: record}, shipper.chunks([record]))
    shipper.enforce_cap([record])
    assert state.log_path(1).stat().st_size == 0
    assert record.log_base_bytes == 150
    with state.log_path(1).open("ab") as f:
        f.write(b"more")
    [chunk] = shipper.chunks([record])
    assert (chunk.offset, chunk.next_offset, chunk.data) == (150, 154, "more")


def test_cap_with_the_server_away_leaves_a_marker(state: StateDir) -> None:
    record = record_with_log(state, b"y" * 250)
    shipper = LogShipper(state, max_bytes=100)
    shipper.enforce_cap([record])
    assert record.log_base_bytes == 250
    [marker] = shipper.chunks([record])
    assert (marker.offset, marker.next_offset) == (0, 250)
    assert "250 bytes of log dropped" in marker.data


def test_an_ended_task_keeps_only_the_tail_of_an_oversized_log(state: StateDir) -> None:
    """A flood that ends between two cap checks: the node keeps the cap's worth of its end."""
    flood = b"x" * 5000 + "é".encode() * 10 + b"\nTerminated\n"
    record = record_with_log(state, flood, task_id=7)
    record.state = "timeout"
    shipper = LogShipper(state, max_bytes=100)
    shipper.enforce_cap([record])
    kept = state.log_path(7).read_bytes()
    assert len(kept) <= 100
    assert kept.endswith(b"\nTerminated\n")
    kept.decode("utf-8")  # cut on a character boundary
    assert record.log_base_bytes == len(flood) - len(kept)
    chunks = shipper.chunks([record])
    assert chunks[0].data.startswith("[fairgpu: ")  # the server is told about the gap
    assert "".join(c.data for c in chunks).endswith("\nTerminated\n")


def test_a_shipped_segmented_log_leaves_the_node(state: StateDir) -> None:
    record = TaskRecord(spec=spec(1), state="exited")
    state.save(record)
    for start, data in ((0, b"first\n"), (6, b"second\n")):
        (state.task_dir(1) / segment_name(start)).write_bytes(data)
    shipper = LogShipper(state, max_bytes=1000)
    chunks = shipper.chunks([record])
    assert "".join(c.data for c in chunks) == "first\nsecond\n"
    shipper.acknowledge({1: record}, chunks)
    assert record.log_complete
    assert list_segments(str(state.task_dir(1))) == []
    assert state.load_all()[0].log_complete  # the record stays: a task never starts twice
