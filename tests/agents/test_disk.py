"""The disk measure and the decisions made from it, on real files (no root needed)."""

from __future__ import annotations

import os
from pathlib import Path

from agents.disk import (
    DiskConfig,
    Space,
    Target,
    Usage,
    deleted_open_bytes,
    largest_under_pressure,
    measure,
    measure_all,
    over_limit,
)

MiB = 2**20


def _fill(path: Path, n_bytes: int) -> None:
    with path.open("wb") as f:
        f.write(os.urandom(n_bytes))
        f.flush()
        os.fsync(f.fileno())  # blocks allocated now, not at writeback


def test_measure_counts_blocks_once_per_inode_and_skips_symlinks(tmp_path: Path) -> None:
    task = tmp_path / "task"
    (task / "a" / "b").mkdir(parents=True)
    _fill(task / "a" / "b" / "data", 4 * MiB)
    os.link(task / "a" / "b" / "data", task / "hardlink")
    outside = tmp_path / "outside"
    _fill(outside, 8 * MiB)
    (task / "link").symlink_to(outside)
    with (task / "sparse").open("wb") as sparse:
        sparse.truncate(2**40)  # a terabyte that holds no block
    used = measure(task, max_files=None)
    assert 4 * MiB <= used.bytes < 5 * MiB
    assert used.files == 6  # a, b, data, hardlink, link, sparse


def test_measure_stops_past_the_file_limit(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}").touch()
    assert measure(tmp_path, max_files=10).files == 11
    assert measure(tmp_path, max_files=None).files == 50
    assert measure(tmp_path / "missing", max_files=None) == Usage(0, 0)


def test_a_deleted_file_held_open_still_counts(tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    with hidden.open("wb") as f:
        hidden.unlink()
        f.write(os.urandom(3 * MiB))
        f.flush()
        os.fsync(f.fileno())
        device = os.lstat(tmp_path).st_dev
        assert deleted_open_bytes([os.getpid()], device) >= 3 * MiB
        assert deleted_open_bytes([os.getpid()], device + 1) == 0
        [usage] = measure_all([Target(1, tmp_path, (os.getpid(),))], max_files=None).values()
        assert usage.bytes >= 3 * MiB
    assert deleted_open_bytes([os.getpid()], device) == 0


def test_over_limit_names_the_limit_in_its_reason() -> None:
    config = DiskConfig(task_max_bytes=10 * MiB, task_max_files=100)
    usage = {1: Usage(5 * MiB, 3), 2: Usage(11 * MiB, 3), 3: Usage(0, 101)}
    ended = over_limit(usage, config)
    assert set(ended) == {2, 3}
    assert ended[2] == (
        "disk limit: the task holds 11.0 MiB of the node's local disk, over its limit of 10.0 MiB"
    )
    assert "more than 100 files" in ended[3]
    assert over_limit(usage, DiskConfig(task_max_files=None)) == {}


def test_under_the_reserve_the_largest_holder_is_ended() -> None:
    usage = {1: Usage(5 * MiB, 1), 2: Usage(9 * MiB, 1), 3: Usage(0, 1)}
    config = DiskConfig(node_reserve_bytes=100 * MiB, pressure_min_task_bytes=1)
    assert largest_under_pressure(usage, Space(200 * MiB, 10**12), config) is None
    chosen = largest_under_pressure(usage, Space(50 * MiB, 10**12), config)
    assert chosen is not None
    assert chosen[0] == 2
    assert "fell under its reserve of 100.0 MiB" in chosen[1]
    assert largest_under_pressure({3: Usage(0, 1)}, Space(0, 10**12), config) is None
    # A disk full of something else: tasks holding little are not ended for it.
    small = DiskConfig(node_reserve_bytes=100 * MiB, pressure_min_task_bytes=10 * MiB)
    assert largest_under_pressure(usage, Space(50 * MiB, 10**12), small) is None
    chosen = largest_under_pressure({**usage, 4: Usage(10 * MiB, 1)}, Space(0, 10**12), small)
    assert chosen is not None
    assert chosen[0] == 4
    # By default the reserve is 5% of the filesystem; 0 turns it off.
    ratio = DiskConfig(pressure_min_task_bytes=1)
    assert largest_under_pressure(usage, Space(4 * MiB, 100 * MiB), ratio) is not None
    assert largest_under_pressure(usage, Space(6 * MiB, 100 * MiB), ratio) is None
    assert largest_under_pressure(usage, Space(0, 100), DiskConfig(node_reserve_bytes=0)) is None
    assert not DiskConfig(task_max_files=None, node_reserve_bytes=0).enabled
