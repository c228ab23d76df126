"""The load generator of `fairgpu bench api`, run as its own process (`python -m ...loadgen`).

It speaks HTTP/1.1 over kept-alive loopback connections with requests built as bytes, the way
wrk does: a general-purpose client library would spend more CPU per request than the server
does, and on a two-core machine that would measure the client. Replies are parsed only as far
as status and body; heartbeat replies are decoded so that tasks the server starts are reported
back as running in the node's next heartbeat (real task states, not an empty list).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psutil

GPUS_PER_NODE = 8
MAX_WARMUP_ROUNDS = 40
MAX_QUIET_WARMUP_ROUNDS = 10
WARMUP_PAUSE_S = 1.0


def server_cpu_s(pid: int) -> float:
    """CPU seconds used so far by the server and its worker processes."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
    except psutil.Error:
        return 0.0
    return total


def postgres_cpu_s() -> dict[int, float]:
    """CPU seconds so far of every PostgreSQL process on the machine, by pid (this includes
    work done for other clients of the same server)."""
    out: dict[int, float] = {}
    for proc in psutil.process_iter(["name"]):
        if proc.info.get("name") in ("postgres", "postmaster"):
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                out[proc.pid] = times.user + times.system
    return out


def postgres_cpu_since(before: dict[int, float]) -> float:
    """CPU used since `before` by PostgreSQL processes alive now (exited ones are not seen)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in postgres_cpu_s().items())


@dataclass
class PhaseResult:
    requests: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    postgres_cpu_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2)

        return {
            "requests": self.requests,
            "errors": self.errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "elapsed_s": round(self.elapsed_s, 3),
            "per_s": round(self.requests / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "max_ms": round(lat[-1] * 1000, 2) if lat else None,
            "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else None,
            # CPU per request: the figure that does not depend on what else the machine runs.
            "server_cpu_ms_per_request": round(self.server_cpu_s / self.requests * 1000, 3)
            if self.requests
            else None,
            "server_cpu_s": round(self.server_cpu_s, 2),
            "postgres_cpu_s": round(self.postgres_cpu_s, 2),
            "client_cpu_s": round(self.client_cpu_s, 2),
            # What the machine could sustain if server, database and client had every core to
            # themselves: cores ÷ CPU seconds per request. An estimate, labelled as one.
            "cpu_bound_estimate_per_s": self.cpu_estimate(),
        }

    def cpu_estimate(self) -> float | None:
        used = self.server_cpu_s + self.postgres_cpu_s + self.client_cpu_s
        if not self.requests or used <= 0:
            return None
        return round((psutil.cpu_count() or 1) * self.requests / used, 1)


class Connection:
    """One kept-alive HTTP/1.1 connection: send a request, read one reply."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(
        self, method: str, path: str, token: str, body: bytes, extra: str = ""
    ) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            await self.open()
        assert self.writer is not None
        assert self.reader is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        )
        self.writer.write(head.encode() + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header[9:12])
        length = 0
        for line in header.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        payload = await self.reader.readexactly(length) if length else b""
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run_phase(
    host: str,
    port: int,
    concurrency: int,
    duration_s: float,
    make: Callable[[int, int], tuple[str, str, str, bytes, str]],
    on_reply: Callable[[int, int, bytes], None] | None = None,
    server_pid: int | None = None,
    stop_after: int | None = None,
) -> PhaseResult:
    """`concurrency` connections, each sending back-to-back requests for `duration_s` (or
    `stop_after` requests each).

    `make(worker, i)` builds (method, path, token, body, extra headers) for request `i`.
    """
    result = PhaseResult()
    conns = [Connection(host, port) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    cpu_before = server_cpu_s(server_pid) if server_pid else 0.0
    pg_before = postgres_cpu_s()
    client_before = time.process_time()
    start = time.perf_counter()
    stop_at = start + duration_s

    async def worker(w: int, conn: Connection) -> None:
        i = 0
        while time.perf_counter() < stop_at and (stop_after is None or i < stop_after):
            method, path, token, body, extra = make(w, i)
            t0 = time.perf_counter()
            try:
                status, payload = await conn.request(method, path, token, body, extra)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                result.errors += 1
                conn.close()
                await conn.open()
                continue
            result.latencies_s.append(time.perf_counter() - t0)
            result.requests += 1
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status >= 400:
                result.errors += 1
            elif on_reply is not None:
                on_reply(w, i, payload)
            i += 1

    await asyncio.gather(*(worker(w, c) for w, c in enumerate(conns)))
    result.elapsed_s = time.perf_counter() - start
    result.client_cpu_s = time.process_time() - client_before
    result.postgres_cpu_s = postgres_cpu_since(pg_before)
    if server_pid:
        result.server_cpu_s = server_cpu_s(server_pid) - cpu_before
    for c in conns:
        c.close()
    return result


def _register_body(n: int, run_id: str) -> bytes:
    return json.dumps(
        {
            "name": f"bench-{run_id}-{n}",
            "site": "bench",
            "domain": f"rack{n // 32}",
            "hostname": f"bench-{n}",
            "address": "127.0.0.1",
            "agent_version": "bench",
            "gpus": [
                {
                    "index": g,
                    "uuid": f"GPU-{run_id}-{n}-{g}",
                    "model": "H100",
                    "memory_bytes": 80 * 2**30,
                    "nvlink_peers": [p for p in range(GPUS_PER_NODE) if p != g],
                }
                for g in range(GPUS_PER_NODE)
            ],
        }
    ).encode()


async def register_nodes(
    host: str, port: int, join_token: str, count: int, run_id: str
) -> list[str]:
    """Register `count` nodes (setup, not measured); returns their credentials."""
    creds: list[str] = [""] * count
    conns = [Connection(host, port) for _ in range(min(16, count))]
    queue = list(range(count))

    async def register(conn: Connection, n: int) -> None:
        for _ in range(5):  # 409: two first registrations raced to create the site; retry
            status, payload = await conn.request(
                "POST", "/v1/agent/register", join_token, _register_body(n, run_id)
            )
            if status != 409:
                break
        if status != 200:
            raise RuntimeError(f"registration failed: {status} {payload[:200]!r}")
        creds[n] = json.loads(payload)["credential"]

    async def worker(conn: Connection) -> None:
        while queue:
            await register(conn, queue.pop())

    await register(conns[0], queue.pop())  # creates the site
    await asyncio.gather(*(worker(c) for c in conns))
    for c in conns:
        c.close()
    return creds


def _samples(now: str, energy: float) -> list[dict[str, Any]]:
    return [
        {
            "index": g,
            "uuid": "",  # filled per node
            "sampled_at": now,
            "utilization_ratio": 0.93,
            "memory_used_bytes": 60 * 2**30,
            "memory_total_bytes": 80 * 2**30,
            "temperature_c": 61.0,
            "power_w": 550.0,
            "energy_joules": energy,
            "ecc_uncorrected_total": 0,
            "ecc_corrected_total": 0,
        }
        for g in range(GPUS_PER_NODE)
    ]


async def main(args: dict[str, Any]) -> dict[str, Any]:
    host, port = args["host"], args["port"]
    out: dict[str, Any] = {}
    accepted = 0  # jobs submitted: the warm-up waits for as many as fit to run
    submit_body = json.dumps(
        {
            "name": "bench",
            "command": ["python", "train.py", "--lr", "3e-4", "--epochs", "10"],
            "env": {"WANDB_MODE": "offline"},
            "gpus_per_node": 1,
            "gpu_type": args["job_gpu_type"],
            "time_limit": 3600,
        }
    ).encode()
    user_token = args["user_token"]

    def make_submit(w: int, i: int) -> tuple[str, str, str, bytes, str]:
        return "POST", "/v1/jobs", user_token, submit_body, ""

    if args["submit_s"] > 0:
        res = await run_phase(
            host,
            port,
            args["concurrency"],
            args["submit_s"],
            make_submit,
            server_pid=args.get("server_pid"),
        )
        out["submit"] = res.summary()
        accepted += res.statuses.get(201, 0)

    if args["heartbeat_s"] > 0 and args["nodes"] > 0:
        creds = await register_nodes(host, port, args["join_token"], args["nodes"], args["run_id"])
        running: list[dict[int, dict[str, Any]]] = [{} for _ in creds]
        energy = [0.0]
        started = [0]
        per_worker = max(1, len(creds) // int(args["concurrency"]))

        def node_of(w: int, i: int) -> int:
            return (w * per_worker + i % per_worker) % len(creds)

        def make_hb(w: int, i: int) -> tuple[str, str, str, bytes, str]:
            n = node_of(w, i)
            now = datetime.now(UTC).isoformat()
            energy[0] += 1.0
            samples = _samples(now, 1000.0 + energy[0])
            for g, s in enumerate(samples):
                s["uuid"] = f"GPU-{args['run_id']}-{n}-{g}"
            body = {"samples": samples, "tasks": list(running[n].values()), "wait_s": 0}
            return "POST", "/v1/agent/heartbeat", creds[n], json.dumps(body).encode(), ""

        def on_hb(w: int, i: int, payload: bytes) -> None:
            reply = json.loads(payload)
            n = node_of(w, i)
            now = datetime.now(UTC).isoformat()
            for spec in reply.get("start", []):
                started[0] += spec["task_id"] not in running[n]
                running[n][spec["task_id"]] = {
                    "task_id": spec["task_id"],
                    "job_id": spec["job_id"],
                    "state": "running",
                    "pid": 1000 + spec["task_id"] % 30000,
                    "started_at": now,
                }
            for stop in reply.get("stop", []):
                running[n].pop(stop["task_id"], None)

        # Warm-up, not measured: rounds of one heartbeat per node, as agents send them, until
        # every GPU that the submissions above can fill runs a task whose start is acknowledged
        # (or the scheduler places nothing more for a few rounds). The measured phase is then
        # the steady state of a running cluster: heartbeats with running tasks and samples, not
        # the start-up of thousands of jobs (`fairgpu bench latency` measures starts).
        target = min(len(creds) * GPUS_PER_NODE, accepted)
        warm_requests, rounds, quiet = 0, 0, 0
        while rounds < MAX_WARMUP_ROUNDS:
            rounds += 1
            before = started[0]
            warm = await run_phase(
                host, port, args["concurrency"], float("inf"), make_hb, on_hb, stop_after=per_worker
            )
            warm_requests += warm.requests
            if started[0] != before:
                quiet = 0
                continue
            quiet += 1
            if sum(len(r) for r in running) >= target or quiet >= MAX_QUIET_WARMUP_ROUNDS:
                break
            await asyncio.sleep(WARMUP_PAUSE_S)  # a scheduling cycle at a long queue takes time
        res = await run_phase(
            host,
            port,
            args["concurrency"],
            args["heartbeat_s"],
            make_hb,
            on_hb,
            args.get("server_pid"),
        )
        out["heartbeat"] = res.summary()
        out["heartbeat"]["nodes"] = len(creds)
        out["heartbeat"]["warmup_requests"] = warm_requests
        out["heartbeat"]["warmup_rounds"] = rounds
        out["heartbeat"]["tasks_reported"] = sum(len(r) for r in running)
    return out


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        pass
    params = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(main(params))))
