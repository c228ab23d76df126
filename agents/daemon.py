"""The agent's main loop: register once, then heartbeat (long-poll) and act on the replies.

One loop owns the runner. While a heartbeat is held by the server, a watcher keeps polling the
runner (exits, time limits, kill deadlines); when a task changes state it cuts the held request
short so that the server hears at once. Cutting a request loses nothing: the protocol re-sends
starts and stops until the agent has reported the task, and reports until a reply arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlsplit

from agents import disk, idle, shells
from agents.client import AgentClient, AuthError, ServerUnavailable
from agents.gpu import GpuBackend
from agents.idle import IdleWatch
from agents.isolation import IsolationConfig, open_confinement
from agents.logs import LogShipper
from agents.metrics import AgentMetrics, DcgmJobMapping
from agents.runner import Runner, RunnerConfig, allocations
from agents.state import Credential, StateDir, TaskRecord
from agents.streams import Streams, notify_terminal
from protocol.agent import (
    AGENT_CAPABILITIES,
    CONTAINER_CAPABILITY,
    CONTAINER_NETNS_CAPABILITY,
    MAX_TASKS_PER_HEARTBEAT,
    MAX_WAIT_S,
    NETNS_CAPABILITY,
    AgentRegister,
    GpuSample,
    Heartbeat,
    HeartbeatReply,
)
from protocol.states import TERMINAL_TASK_STATES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    server: str
    state_dir: Path
    name: str
    site: str = "default"
    domain: str = "default"
    join_token: str | None = None
    address: str | None = None
    poll_interval_s: float = 0.1
    """How often the runner is checked for exits and deadlines."""
    max_backoff_s: float = 30.0
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    dcgm_mapping_dir: Path | None = None
    keep_ended_tasks_s: float = 86_400.0
    """How long records and logs of reported tasks stay on the node after the server has them."""
    isolation: IsolationConfig = field(default_factory=IsolationConfig)


class AgentError(Exception):
    """A condition the agent cannot recover from by itself (bad token, no credential)."""


def agent_version() -> str:
    try:
        return version("fairgpu")
    except PackageNotFoundError:
        return "0+unknown"


def outbound_address(server: str) -> str:
    """The local address the server's host is reached from; UDP connect sends no packet."""
    parts = urlsplit(server)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        backend: GpuBackend,
        client: AgentClient,
        *,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.client = client
        self.state = StateDir(config.state_dir)
        confinement = open_confinement(
            config.isolation,
            self.state.root,
            gpu_minors=backend.device_minors(),
            total_gpus=len(backend.devices()),
        )
        self.runner = Runner(self.state, config.runner, confinement)
        self.logs = LogShipper(self.state, max_bytes=config.runner.log_max_bytes)
        self.metrics = metrics
        self.idle = IdleWatch()
        self.streams = Streams(
            config.server,
            client.tls,
            on_input=self.idle.touch,
            privileged_source_port=client.privileged_source_port,
        )
        self.dcgm = (
            DcgmJobMapping(config.dcgm_mapping_dir, [g.index for g in backend.devices()])
            if config.dcgm_mapping_dir
            else None
        )
        self.credential: Credential | None = None
        self._join_token = config.join_token
        """Kept only until the node is registered: a join token never takes over a node."""
        self._isolation_reported = False
        self._capabilities_reported: list[str] | None = None
        """What the server last heard this agent can do (None: nothing yet since it started)."""
        self.heartbeat_interval_s = 10.0
        self.connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._reported: set[tuple[int, str]] = set()
        """(task, state) pairs the last answered heartbeat reported."""

    async def register(self) -> Credential:
        """Use the stored credential for this server, or register with the join token."""
        stored = self.state.load_credential()
        if stored is not None and stored.server == self.config.server:
            self.credential = stored
            self._forget_join_token()
            return stored
        if not self._join_token:
            raise AgentError("this node is not registered: pass --join-token to register it")
        body = AgentRegister(
            name=self.config.name,
            site=self.config.site,
            domain=self.config.domain,
            hostname=socket.gethostname(),
            address=self.config.address or outbound_address(self.config.server),
            agent_version=agent_version(),
            gpus=self.backend.devices(),
            isolation=self.runner.confinement.mode,
            capabilities=self.capabilities(),
            memory_per_gpu_bytes=self.runner.confinement.memory_per_gpu_bytes,
        )
        try:
            reply = await self.client.register(self._join_token, body)
        except AuthError as exc:
            raise AgentError(f"the server refused the join token ({exc})") from exc
        self.credential = Credential(
            server=self.config.server,
            node_id=reply.node_id,
            node_name=reply.node_name,
            credential=reply.credential,
        )
        self.state.save_credential(self.credential)
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        self._isolation_reported = True
        self._capabilities_reported = body.capabilities
        self._forget_join_token()
        log.info("registered as node %s (id %d)", reply.node_name, reply.node_id)
        return self.credential

    def capabilities(self) -> list[str]:
        """What this agent can do: "container" where its container runtime answers
        (Runner.containers), "netns" only where it can build the namespaces and their wall
        stands (agents/wallwatch.py), and "container-netns" beside both where its runtime can
        put a container in one (Runner.containers_join_netns)."""
        containers = self.runner.containers.works
        caps = [*AGENT_CAPABILITIES, *([CONTAINER_CAPABILITY] if containers else [])]
        wall = self.runner.confinement.wall
        if wall is None or not wall.intact:
            return caps
        private = containers and self.runner.containers_join_netns
        return [*caps, NETNS_CAPABILITY, *([CONTAINER_NETNS_CAPABILITY] if private else [])]

    def _renew(self, credential: str) -> None:
        """The server renewed the node's credential: keep it (atomically) and use it next."""
        assert self.credential is not None
        self.credential = self.credential.model_copy(update={"credential": credential})
        self.state.save_credential(self.credential)
        log.info("node credential renewed")

    def _forget_join_token(self) -> None:
        """Registered: the join token leaves the agent's memory and environment."""
        self._join_token = None
        os.environ.pop("FAIRGPU_JOIN_TOKEN", None)

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set. Tasks keep running after the agent stops (see Runner)."""
        self.runner.recover()
        # Time limits and stops are enforced even before the server is reachable.
        watcher = asyncio.create_task(self._watch(stop))
        disk_watcher = asyncio.create_task(self._watch_disk(stop))
        wall_watcher = asyncio.create_task(self._watch_wall(stop))
        runtime_watcher = asyncio.create_task(self._watch_runtime(stop))
        backoff_s = 0.5
        try:
            await self._register_with_retry(stop)
            while not stop.is_set():
                try:
                    await self._heartbeat_once(stop)
                    backoff_s = 0.5
                except ServerUnavailable as exc:
                    self.connected.clear()
                    log.warning("server unavailable, retrying in %.1f s: %s", backoff_s, exc)
                    await _sleep_or(stop, backoff_s * random.uniform(0.8, 1.2))
                    backoff_s = min(backoff_s * 2, self.config.max_backoff_s)
                except AuthError as exc:
                    # Revoked or expired: it will never work again. Forgetting it lets the
                    # agent, restarted with a new join token after `fairgpu node approve`,
                    # register the node anew instead of presenting the dead one forever.
                    self.connected.clear()
                    self.state.forget_credential()
                    raise AgentError(
                        f"the server refused this node's credential ({exc}): a platform admin "
                        f"runs `fairgpu node approve {self.config.name}`, then start the agent "
                        "with a new join token"
                    ) from exc
                except (AgentError, asyncio.CancelledError):
                    raise
                except Exception:
                    # A bug or a surprise must not stop the heartbeats of a node running jobs.
                    log.exception("heartbeat failed; retrying in %.1f s", backoff_s)
                    await _sleep_or(stop, backoff_s)
                    backoff_s = min(backoff_s * 2, self.config.max_backoff_s)
        finally:
            watchers = (watcher, disk_watcher, wall_watcher, runtime_watcher)
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await self.streams.close()
            # Shielded: a cancelled to_thread that no worker had started yet never runs, and
            # a wall still followed would then make anew the table close_network removes.
            await asyncio.shield(asyncio.to_thread(self._close_network))

    async def _register_with_retry(self, stop: asyncio.Event) -> None:
        backoff_s = 0.5
        while not stop.is_set():
            try:
                await self.register()
                return
            except ServerUnavailable as exc:
                log.warning("cannot register yet, retrying in %.1f s: %s", backoff_s, exc)
                await _sleep_or(stop, backoff_s)
                backoff_s = min(backoff_s * 2, self.config.max_backoff_s)

    async def _watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if self.runner.poll():
                    self._changed.set()
                await self._enforce_idle()
                self.logs.enforce_cap(list(self.runner.records.values()))
                self.runner.prune(older_than_s=self.config.keep_ended_tasks_s)
            except Exception:
                log.exception("checking tasks failed; trying again")  # e.g. a full disk
            await _sleep_or(stop, self.config.poll_interval_s)

    async def _enforce_idle(self) -> None:
        """Warn, then end, the interactive tasks nobody uses (agents/idle.py); the GPUs, and a
        multi-node session's other ranks' GPUs (through the server), are looked at once more
        before either."""
        sessions = [r for r in self.runner.running() if idle.watches_other_ranks(r)]
        await self._look_at_other_ranks(
            [record for record in sessions if self.idle.needs_baseline(record.task_id)]
        )
        if not self.idle.due(self.runner.running()):
            return
        await self._sample()
        due = {record.task_id for record, _action in self.idle.due(self.runner.running())}
        await self._look_at_other_ranks([record for record in sessions if record.task_id in due])
        for record, action in self.idle.due(self.runner.running()):
            timeout_s = record.spec.idle_timeout_s
            terminal = self.runner.terminal(record.task_id)
            if timeout_s is None or terminal is None:
                continue
            if action == "warn":
                self.idle.warned(record.task_id)
                await notify_terminal(terminal, idle.warning_text(timeout_s))
                continue
            log.info("task %d: idle for %g s, ending it", record.task_id, timeout_s)
            await notify_terminal(terminal, idle.ending_text(timeout_s))
            if self.runner.stop(
                record.task_id,
                grace_s=self.config.runner.time_limit_grace_s,
                reason=idle.STOP_REASON,
            ):
                self._changed.set()

    async def _look_at_other_ranks(self, records: list[TaskRecord]) -> None:
        """Ask the server how busy each multi-node session's other ranks' GPUs have been (once
        when the session is first seen, then only when it is due a warning or an end)."""
        for record in records:
            busy_s: float | None = None
            if self.credential is not None:
                try:
                    use = await self.client.job_gpu_use(self.credential.credential, record.task_id)
                    busy_s = use.busy_gpu_seconds
                except (ServerUnavailable, AuthError) as exc:
                    log.warning(
                        "task %d: its other ranks' GPU use is unknown: %s", record.task_id, exc
                    )
            self.idle.other_ranks(record.task_id, busy_s)

    async def _sample(self) -> list[GpuSample]:
        """Every GPU now; a task whose GPUs are busy counts as used (agents/idle.py)."""
        driven = self.runner.driven_utilization() if self.backend.follows_tasks else None
        samples = await asyncio.to_thread(self.backend.sample, self.runner.busy_gpus(), driven)
        self.idle.observe(samples, self.runner.running())
        return samples

    async def _watch_disk(self, stop: asyncio.Event) -> None:
        """Measure the tasks' disk use in a thread (a task of a million files takes a while to
        walk: heartbeats and deadlines go on meanwhile), then end those over their limits."""
        config = self.config.runner.disk
        if not config.enabled:
            return
        while not stop.is_set():
            await _sleep_or(stop, config.check_interval_s)
            try:
                targets = self.runner.disk_targets()
                usage = await asyncio.to_thread(
                    disk.measure_all, targets, max_files=config.task_max_files
                )
                space = await asyncio.to_thread(disk.space, self.runner.disk_root)
                if self.runner.enforce_disk(usage, space):
                    self._changed.set()
            except Exception:
                log.exception("measuring the tasks' disk use failed; trying again")

    async def _watch_runtime(self, stop: asyncio.Event) -> None:
        """Ask the container runtime again now and then, in a thread; report at once when the
        node can or cannot run containers."""
        if self.config.runner.container_runtime is None:
            return
        while not stop.is_set():
            await _sleep_or(stop, self.config.runner.container_check_interval_s)
            if await asyncio.to_thread(self.runner.containers.check):
                self._changed.set()

    async def _watch_wall(self, stop: asyncio.Event) -> None:
        """Check the private tasks' nftables wall on every change to it and periodically, in
        threads, and put it back where anything removed or changed it; report at once when the
        node can or cannot run private tasks."""
        wall = self.runner.confinement.wall
        if wall is None:
            return
        if self.metrics is not None:
            self.metrics.wall = wall
        loop = asyncio.get_running_loop()

        def changed() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._changed.set)

        wall.follow(self.config.isolation.wall_check_interval_s, changed)
        await stop.wait()  # `run` unfollows, at its end (`_close_network`)

    def _close_network(self) -> None:
        """The agent stops: its wall's monitor and checker end first, then the wall goes
        (unless a task's pasta still needs it), in this order, so that no check makes the wall
        anew behind it."""
        if self.runner.confinement.wall is not None:
            self.runner.confinement.wall.unfollow()
        self.runner.confinement.close_network()

    async def _heartbeat_once(self, stop: asyncio.Event) -> None:
        assert self.credential is not None
        self._changed.clear()
        self.runner.poll()
        samples = await self._sample()
        allocated = allocations(self.runner.records)
        if self.metrics is not None:
            self.metrics.update(samples, allocated)
        if self.dcgm is not None:
            self.dcgm.write(allocated)
        records = self.runner.unacknowledged()[:MAX_TASKS_PER_HEARTBEAT]
        reports = [r.report() for r in records]
        states = {(r.task_id, str(r.state)) for r in reports}
        news = bool(states - self._reported)
        chunks = self.logs.chunks(self.runner.records.values())
        # Hold the request only when there is nothing to flush after it: not on the first
        # heartbeat after (re)connecting, nor while an ended task's log is still being sent.
        flushing = any(
            not r.log_complete
            for r in self.runner.records.values()
            if r.state in TERMINAL_TASK_STATES
        )
        held = self.connected.is_set() and not flushing
        wait_s = min(self.heartbeat_interval_s, MAX_WAIT_S) if held else 0.0
        capabilities = self.capabilities()
        body = Heartbeat(
            samples=samples,
            tasks=reports,
            logs=chunks,
            wait_s=wait_s,
            isolation=None if self._isolation_reported else self.runner.confinement.mode,
            memory_per_gpu_bytes=(
                None if self._isolation_reported else self.runner.confinement.memory_per_gpu_bytes
            ),
            capabilities=None if capabilities == self._capabilities_reported else capabilities,
        )
        if body.capabilities is not None:
            # A request cut short may still have reached the server: until a reply says it has
            # them, what the server knows is unknown, and the next heartbeat sends them again.
            self._capabilities_reported = None
        sent_at = asyncio.get_running_loop().time()
        reply = await self._send_unless_changed(body, stop)
        if reply is None:
            return  # a task changed state locally: report it now, the reply comes again
        self.connected.set()
        self._isolation_reported = True
        self._capabilities_reported = capabilities
        if reply.credential is not None:
            self._renew(reply.credential)
        self.runner.acknowledge({r.task_id for r in reports if r.state in TERMINAL_TASK_STATES})
        self.logs.acknowledge(self.runner.records, chunks)
        self._reported = states
        if self._apply(reply):
            self._changed.set()  # report the new states at once
        elif not news:
            # A reply that changed nothing (a server that does not hold requests, or repeats
            # what the agent already did) must not make the agent spin. One to a heartbeat
            # that carried news was answered at once, unheld: the next one, with none, is
            # held, so that what the server has for this node meanwhile (a terminal stream
            # for a task that has just started) reaches it at once, not a heartbeat later.
            elapsed_s = asyncio.get_running_loop().time() - sent_at
            await _wait_any(stop, self._changed, timeout_s=wait_s - elapsed_s)

    async def _send_unless_changed(
        self, body: Heartbeat, stop: asyncio.Event
    ) -> HeartbeatReply | None:
        assert self.credential is not None
        send = asyncio.create_task(self.client.heartbeat(self.credential.credential, body))
        changed = asyncio.create_task(self._changed.wait())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({send, changed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (changed, stopping):
                task.cancel()
            await asyncio.gather(changed, stopping, return_exceptions=True)
            if not send.done():
                send.cancel()
                await asyncio.gather(send, return_exceptions=True)
        if send.cancelled():
            return None
        return send.result()

    def _apply(self, reply: HeartbeatReply) -> bool:
        """Start and stop what the reply says; True when that changed anything here."""
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        changed = False
        stopping = {stop.task_id for stop in reply.stop}
        for spec in reply.start:
            if spec.task_id not in stopping and self.runner.start(spec):
                changed = True
        for stop in reply.stop:
            changed |= self.runner.stop(
                stop.task_id, grace_s=stop.grace_s, reason=stop.reason, warn=bool(stop.signal)
            )
        if reply.streams and self.credential is not None:
            for request in reply.streams:
                terminal = self.runner.terminal(request.task_id)
                processes = self.runner.processes(request.task_id)
                # A new stream: poll again at once rather than wait out the interval here, so
                # that the next stream (another tenant's, perhaps) comes with the held poll. The
                # server holds that poll, since the streams it has sent are no news.
                shell = (
                    shells.opener(self.runner, request.task_id) if request.kind == "new" else None
                )
                changed |= self.streams.open(
                    request, self.credential.credential, terminal, processes, shell
                )
        return changed


async def _wait_any(stop: asyncio.Event, changed: asyncio.Event, *, timeout_s: float) -> None:
    if timeout_s <= 0:
        return
    waits = {asyncio.create_task(stop.wait()), asyncio.create_task(changed.wait())}
    _done, pending = await asyncio.wait(
        waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
    )
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def _sleep_or(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
