"""The output copier: the log on disk never exceeds its cap, keeps the tail, tells the shipper what
it dropped, captures what a task prints while it is stopped, and survives an agent restart."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.logcap import SegmentedLog, list_segments
from agents.logs import LogShipper
from agents.runner import Runner, RunnerConfig
from agents.state import StateDir, TaskRecord
from tests.agents.helpers import spec, wait_for

PY = sys.executable
CAP = 64 * 1024
# Counted lines with a two-byte character, so that any part of the log says where it came from.
FLOOD = (
    "import sys\ni = 0\nwhile True:\n"
    "    sys.stdout.write(f'line {i:09d} é' + 'x' * 80 + '\\n'); i += 1\n"
)


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    return StateDir(tmp_path / "state")


@pytest.fixture
def runners() -> Iterator[list[Runner]]:
    """Runners a test made: whatever they left running is killed, then reaped."""
    made: list[Runner] = []
    yield made
    for runner in made:
        for child in runner._children.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def make_runner(state: StateDir, made: list[Runner], **config: object) -> Runner:
    runner = Runner(state, RunnerConfig(log_max_bytes=CAP, **config))  # type: ignore[arg-type]
    made.append(runner)
    return runner


def run_to_end(runner: Runner, task_id: int, timeout_s: float = 20.0) -> TaskRecord:
    wait_for(
        lambda: (runner.poll(), runner.records[task_id].state)[1] not in ("starting", "running"),
        timeout_s,
    )
    return runner.records[task_id]


def on_disk(state: StateDir, task_id: int) -> int:
    """Bytes of the task's log on disk, as at one instant.

    Newest segment first: the copier deletes the oldest before it writes to a new one, so an
    oldest segment still there when looked at last means the newest was still empty when looked
    at first. Oldest first would add a new segment's bytes to the one it replaced.
    """
    total = 0
    for _start, path in reversed(list_segments(str(state.task_dir(task_id)))):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(path).st_size
    return total


def written(state: StateDir, task_id: int) -> int:
    """Bytes of output the copier has consumed: the last segment's offset plus its size."""
    segments = list_segments(str(state.task_dir(task_id)))
    if not segments:
        return 0
    start, path = segments[-1]
    try:
        return start + os.stat(path).st_size
    except FileNotFoundError:
        return written(state, task_id)


class DiskSampler:
    """Samples the on-disk size of a task's log as often as it can, in a thread."""

    def __init__(self, state: StateDir, task_id: int) -> None:
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(state, task_id), daemon=True)

    def _run(self, state: StateDir, task_id: int) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, on_disk(state, task_id))
            self.samples += 1

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def copier_of(record: TaskRecord) -> psutil.Process:
    assert record.pid is not None
    for child in psutil.Process(record.pid).children():
        if any("logcap" in part for part in child.cmdline()):
            return child
    raise AssertionError("no copier under the task's wrapper")


def shipped(state: StateDir, record: TaskRecord) -> list[tuple[int, int, str, bool]]:
    shipper = LogShipper(state, max_bytes=CAP)
    out = []
    for _ in range(1000):
        chunks = shipper.chunks([record])
        if not chunks:
            break
        out.extend((c.offset, c.next_offset, c.data, c.eof) for c in chunks)
        shipper.acknowledge({record.task_id: record}, chunks)
        if record.log_complete:
            break
    return out


# -- the segments ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=3000), min_size=1, max_size=60),
    st.integers(min_value=64, max_value=8192),
)
def test_segments_hold_at_most_the_cap_and_exactly_the_tail(
    tmp_path_factory: pytest.TempPathFactory, writes: list[str], cap: int
) -> None:
    directory = tmp_path_factory.mktemp("segments")
    log = SegmentedLog(str(directory), cap)
    everything = b""
    for text in writes:
        data = text.encode()
        log.write(data)
        everything += data
        sizes = [os.stat(p).st_size for _s, p in list_segments(str(directory))]
        assert sum(sizes) <= cap
    log.close()
    segments = list_segments(str(directory))
    kept = b"".join(Path(p).read_bytes() for _s, p in segments)
    first = segments[0][0]
    assert kept == everything[first:]  # the tail, contiguous, and its offset in the name
    assert len(kept) >= min(len(everything), cap // 2 - 3)
    for start, path in segments:
        assert start == 0 or not 0x80 <= everything[start] < 0xC0  # starts on a character
        Path(path).read_bytes().decode()  # so each segment is valid UTF-8 on its own


def test_the_shipper_reads_across_segments_after_a_marker(state: StateDir) -> None:
    record = TaskRecord(spec=spec(3), state="exited")
    state.save(record)
    log = SegmentedLog(str(state.task_dir(3)), 1000)
    data = "".join(f"{i:05d}é\n" for i in range(2000)).encode()
    for i in range(0, len(data), 333):
        log.write(data[i : i + 333])
    log.close()
    first = list_segments(str(state.task_dir(3)))[0][0]
    chunks = shipped(state, record)
    assert chunks[0] == (
        0,
        first,
        f"[fairgpu: {first} bytes of log dropped on the node (size cap)]\n",
        False,
    )
    assert "".join(c[2] for c in chunks[1:]).encode() == data[first:]
    assert [c[1] for c in chunks[:-1]] == [c[0] for c in chunks[1:]]  # contiguous offsets
    assert chunks[-1][1:] == (len(data), chunks[-1][2], True)


# -- real tasks --------------------------------------------------------------------------------


def test_a_flooding_task_never_has_more_than_the_cap_on_disk(
    state: StateDir, runners: list[Runner]
) -> None:
    runner = make_runner(state, runners)
    # The shell's own stderr is dropped: whether it reports the `yes` it killed ("Terminated")
    # depends on when it notices, which varies from run to run.
    command = ["sh", "-c", "exec 2>/dev/null; yes & p=$!; sleep 2; kill $p; wait $p; echo THE END"]
    with DiskSampler(state, 1) as sampler:
        runner.start(spec(1, command))
        record = run_to_end(runner, 1)
    assert (record.state, record.exit_code) == ("exited", 0)
    assert sampler.samples > 100
    assert 0 < sampler.peak <= CAP, sampler.peak
    assert written(state, 1) > 10 * CAP  # it did flood
    tail = state.read_log(record)
    end = b"THE END\n"
    assert tail.endswith(end)
    assert set(tail[: -len(end)].split(b"\n")) <= {b"y", b""}  # nothing but what `yes` wrote
    chunks = shipped(state, record)
    assert chunks[0][2].startswith("[fairgpu: ")
    assert "dropped on the node" in chunks[0][2]
    assert chunks[-1][3] is True
    assert chunks[-1][2].endswith(end.decode())


def test_what_a_task_prints_after_sigterm_is_captured(
    state: StateDir, runners: list[Runner], tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    # The handler only notes the signal and the loop saves: Python runs a handler wherever the
    # main thread checks for signals, which includes the middle of a flush of stdout, and a
    # print there fails ("reentrant call inside BufferedWriter", exit 1; once in CI).
    code = (
        "import pathlib, signal, sys, time\n"
        "stopping = []\n"
        "signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "while not stopping: print('training', flush=True); time.sleep(0.01)\n"
        "for i in range(5000): print(f'saving shard {i}')\n"
        "print('checkpoint written, bye', flush=True)\n"
    )
    runner = make_runner(state, runners)
    runner.start(spec(1, [PY, "-c", code]))
    wait_for(ready.exists)
    runner.stop(1, grace_s=10, reason="preempted")
    record = run_to_end(runner, 1)
    assert (record.state, record.exit_code) == ("stopped", 0)
    log = state.read_log(record).decode()
    assert log.endswith("saving shard 4999\ncheckpoint written, bye\n")
    assert on_disk(state, 1) <= CAP


def test_output_up_to_sigkill_is_captured(
    state: StateDir, runners: list[Runner], tmp_path: Path
) -> None:
    """The copier is in a process group of its own: SIGKILL of the task's group spares it."""
    ready = tmp_path / "ready"
    code = (
        "import pathlib, signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('SIGTERM? carrying on', flush=True))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
        "while True: time.sleep(60)\n"
    )
    runner = make_runner(state, runners)
    runner.start(spec(1, [PY, "-c", code]))
    wait_for(ready.exists)
    runner.stop(1, grace_s=0.5, reason="cancelled")
    record = run_to_end(runner, 1)
    assert (record.state, record.signal, record.killed) == ("stopped", signal.SIGKILL, True)
    assert state.read_log(record).decode().startswith("SIGTERM? carrying on\n")


def test_the_copier_ignores_signals_and_leaves_with_its_last_writer(
    state: StateDir, runners: list[Runner], tmp_path: Path
) -> None:
    runner = make_runner(state, runners)
    runner.start(
        spec(1, [PY, "-c", "import time\nwhile True: print('tick', flush=True); time.sleep(0.01)"])
    )
    record = runner.records[1]
    wait_for(lambda: written(state, 1) > 0)
    copier = copier_of(record)
    assert os.getpgid(copier.pid) != record.pid  # not in the task's process group
    assert os.getsid(copier.pid) == record.pid  # but in its session
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        copier.send_signal(sig)
    before = written(state, 1)
    wait_for(lambda: written(state, 1) > before + 100)  # still copying
    assert copier.status() != psutil.STATUS_ZOMBIE
    runner.stop(1, grace_s=5, reason="done")
    record = run_to_end(runner, 1)
    assert record.state == "stopped"
    copier.wait(timeout=5)  # its input ended: it is gone


def test_output_of_a_child_outliving_the_task_is_waited_for_then_given_up(
    state: StateDir, runners: list[Runner], tmp_path: Path
) -> None:
    runner = make_runner(state, runners)
    late = ["sh", "-c", "(sleep 0.5; echo late) & echo early"]
    runner.start(spec(1, late))
    record = run_to_end(runner, 1)
    assert record.state == "exited"
    assert state.read_log(record) == b"early\nlate\n"  # the copier waited for the last writer

    pidfile = tmp_path / "pid"
    stuck = make_runner(state, runners, output_drain_s=0.5)
    stuck.start(spec(2, ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo started"]))
    t0 = time.monotonic()
    record = run_to_end(stuck, 2)
    assert 0.4 <= time.monotonic() - t0 < 5
    assert (record.state, record.exit_code) == ("exited", 0)
    assert state.read_log(record) == b"started\n"
    os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_new_runner_adopts_a_flooding_task_and_its_copier(
    state: StateDir, runners: list[Runner]
) -> None:
    """An agent restart: the task neither notices nor dies of SIGPIPE; the log goes on."""
    first = make_runner(state, runners)
    first.start(spec(1, [PY, "-c", FLOOD]))
    wait_for(lambda: written(state, 1) > 4 * CAP)
    copier = copier_of(first.records[1])

    second = make_runner(state, runners)  # the new agent: same state directory
    second.recover()
    assert second.records[1].state == "running"
    at_restart = written(state, 1)
    wait_for(lambda: written(state, 1) > at_restart + 4 * CAP)  # still flooding
    assert copier.is_running()
    second.stop(1, grace_s=5, reason="cancelled")
    wait_for(lambda: first._children[1].poll() is not None)  # reaped, as init would
    record = run_to_end(second, 1)
    assert (record.state, record.signal) == ("stopped", signal.SIGTERM)
    assert on_disk(state, 1) <= CAP
    log = state.read_log(record).decode()
    assert log.endswith("Terminated\n")
    lines = log.splitlines()[1:-1]  # the first may be cut; the last is the wrapper's
    numbers = [int(line.split()[1]) for line in lines if line.startswith("line ")]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # nothing lost within


def test_a_flood_is_held_to_the_rate_limit(state: StateDir, runners: list[Runner]) -> None:
    rate = 1024 * 1024  # bursts of 4 s' worth, then 1 MiB/s
    runner = make_runner(state, runners, log_max_rate_bytes_per_s=rate)
    t0 = time.monotonic()
    runner.start(spec(1, ["yes"]))
    wait_for(lambda: written(state, 1) >= 4 * rate, 20)  # the burst
    time.sleep(1.5)
    elapsed = time.monotonic() - t0
    assert written(state, 1) <= 4 * rate + rate * (elapsed + 0.1) + 64 * 1024
    runner.stop(1, grace_s=5, reason="done")
    assert run_to_end(runner, 1).state == "stopped"


def test_a_relative_state_dir_and_a_job_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runners: list[Runner]
) -> None:
    """The wrapper and the copier run in the job's directory: the state paths must not move."""
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    state = StateDir(Path("relative-state"))
    runner = make_runner(state, runners)
    runner.start(spec(1, ["sh", "-c", "pwd; exit 4"], workdir=str(workdir)))
    record = run_to_end(runner, 1)
    assert (record.state, record.exit_code) == ("exited", 4)
    assert state.read_log(record) == f"{workdir}\n".encode()
