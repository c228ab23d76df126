"""The scheduler in a process of its own, beside a host's HTTP workers.

`fairgpu server --workers N` (PostgreSQL) runs N uvicorn workers with `run_scheduler` off and one
process that runs only the scheduler loop (lease, cycles, lifecycle, accounting). A cycle over a
long queue is a tenth of a second of CPU or more; run inside an HTTP worker it stalls every
request that worker holds, which is what set the heartbeats' p99. The workers ask for cycles
and the scheduler wakes their held long-polls over PostgreSQL (scheduler/services/wakeups.py).

The process serves no HTTP; its instruments reach `/metrics` through Prometheus' multiprocess
mode (scheduler/metrics.py). `SchedulerProcess` is the parent's side: it starts the process
(`python -m scheduler.process`, a fresh interpreter, as `ps` shows it) with the parent's
settings as JSON on its standard input (it reads no FAIRGPU_* variable), starts it again if it
dies of anything but a stop request, and stops it with SIGTERM (the lease is released before it
exits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import threading

from prometheus_client.multiprocess import mark_process_dead

from scheduler.db.engine import make_server_engine, make_sessionmaker
from scheduler.db.migrate import run_migrations
from scheduler.metrics import multiprocess_dir
from scheduler.settings import Settings

log = logging.getLogger("fairgpu.scheduler")

# The loop, the lifecycle and accounting need a few connections, not an HTTP worker's pool.
POOL_SIZE = 4
RESTART_DELAY_S = 2.0
STOP_TIMEOUT_S = 25.0


async def serve_scheduler(settings: Settings, stop: asyncio.Event) -> None:
    """Run the scheduler loop until `stop` is set; the lease is released on the way out."""
    from scheduler.services.runtime import SchedulerRuntime

    settings = settings.model_copy(
        update={"run_scheduler": True, "heartbeat_flush_interval_s": 0.0}
    )
    engine = make_server_engine(settings, pool_size=POOL_SIZE)
    try:
        if settings.migrate_on_start:
            await run_migrations(engine)
        runtime = SchedulerRuntime(
            settings=settings, sessionmaker=make_sessionmaker(engine), engine=engine
        )
        await runtime.start()
        # What start-up built lives as long as the process: keep it out of full collections.
        gc.collect()
        gc.freeze()
        log.info("scheduler process %d running", os.getpid())
        try:
            await stop.wait()
        finally:
            await runtime.stop()
    finally:
        await engine.dispose()


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve_scheduler(settings, stop)


def main(log_level: str = "info") -> None:
    """The process: the parent's settings arrive as JSON on standard input."""
    settings = Settings.from_child_json(sys.stdin.read())
    logging.basicConfig(
        level=log_level.upper(), format="%(levelname)s:     [scheduler] %(name)s: %(message)s"
    )
    import uvloop

    uvloop.run(_main(settings))


def forget_process_metrics(pid: int | None) -> None:
    """A dead process's live gauges (it may have died leading) leave the host's scrapes."""
    if pid is not None and multiprocess_dir() is not None:
        mark_process_dead(pid)  # type: ignore[no-untyped-call]


class SchedulerProcess:
    """The parent's handle: start, keep running, stop."""

    def __init__(self, settings: Settings, *, log_level: str = "info") -> None:
        self.settings_json = settings.to_child_json()
        self.log_level = log_level
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        self._stopping.clear()
        self._spawn()
        self._watchdog = threading.Thread(
            target=self._watch, name="fairgpu-scheduler-watchdog", daemon=True
        )
        self._watchdog.start()

    def _spawn(self) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "scheduler.process", "--log-level", self.log_level],
            stdin=subprocess.PIPE,
        )
        assert process.stdin is not None
        # Far below a pipe's buffer: the write does not wait for the child. One that died
        # before reading is the watchdog's to start again.
        with contextlib.suppress(BrokenPipeError), process.stdin:
            process.stdin.write(self.settings_json.encode())
        self._process = process

    def _watch(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            try:
                code = process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            if self._stopping.is_set():
                continue
            forget_process_metrics(process.pid)
            if code == 0:
                return  # asked to stop (a signal to the whole process group)
            log.error(
                "scheduler process %s exited with %s; starting another in %.0f s",
                process.pid,
                code,
                RESTART_DELAY_S,
            )
            if self._stopping.wait(RESTART_DELAY_S):
                return
            self.restarts += 1
            self._spawn()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not released the lease and exited in time."""
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join()
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("scheduler process %s did not stop; killing it", process.pid)
                process.kill()
                process.wait()
        forget_process_metrics(process.pid)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="fairgpu's scheduler process (see the module).")
    parser.add_argument("--log-level", default="info")
    main(parser.parse_args().log_level)
