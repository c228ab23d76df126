"""`fairgpu agent`: the node agent that runs on every GPU server."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import fail
from protocol.transport import plain_http_refusal

if TYPE_CHECKING:
    from agents.daemon import AgentConfig


def _default_name() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]) or "node"


def agent(
    server: Annotated[
        str, typer.Option(help="fairgpu server URL.", envvar="FAIRGPU_SERVER", show_envvar=True)
    ],
    join_token: Annotated[
        str | None,
        typer.Option(
            help="Join token to register this node (not needed once registered).",
            envvar="FAIRGPU_JOIN_TOKEN",
            show_envvar=True,
        ),
    ] = None,
    simulate: Annotated[
        str | None,
        typer.Option(
            help="Simulate GPUs instead of NVML, e.g. 8xH100 or 4xA100-80GB,2xL40S.",
            envvar="FAIRGPU_AGENT_SIMULATE",
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Credential, task records and logs (default: ./fairgpu-state/agent-NAME).",
            envvar="FAIRGPU_AGENT_STATE_DIR",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve Prometheus /metrics on this port.", envvar="FAIRGPU_AGENT_METRICS_PORT"
        ),
    ] = None,
    metrics_addr: Annotated[str, typer.Option(help="Address for /metrics.")] = "0.0.0.0",
    metrics_token: Annotated[
        str | None,
        typer.Option(
            help="Bearer token /metrics asks for (tasks share the node's network).",
            envvar="FAIRGPU_AGENT_METRICS_TOKEN",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Node name (default: host name).", envvar="FAIRGPU_NODE_NAME")
    ] = None,
    site: Annotated[
        str, typer.Option(help="Site (data centre) of this node.", envvar="FAIRGPU_SITE")
    ] = "default",
    domain: Annotated[
        str,
        typer.Option(help="Topology domain (rack, NVLink group).", envvar="FAIRGPU_DOMAIN"),
    ] = "default",
    address: Annotated[
        str | None,
        typer.Option(help="Address other nodes reach this one at (MASTER_ADDR); default: auto."),
    ] = None,
    cuda_uuids: Annotated[
        bool, typer.Option(help="Set CUDA_VISIBLE_DEVICES to GPU uuids, not indices.")
    ] = False,
    container_runtime: Annotated[
        str | None,
        typer.Option(help="Run jobs with an image through docker, podman or apptainer."),
    ] = None,
    container_binary: Annotated[
        str | None, typer.Option(help="Path of the container runtime's command.")
    ] = None,
    container_pause_image: Annotated[
        str | None,
        typer.Option(
            help="With docker: the image of each private task's pod (e.g. "
            "registry.k8s.io/pause:3.9, pulled beforehand), whose network namespace the task's "
            "container joins. Without it docker runs no task that asks for a private network.",
        ),
    ] = None,
    exec_helper: Annotated[
        Path | None,
        typer.Option(
            help="With docker or podman: the static fairgpu-exec every container starts "
            "through (default: the one `make helper` builds in the agents package). Without it "
            "the node runs no docker or podman job.",
            envvar="FAIRGPU_AGENT_EXEC_HELPER",
        ),
    ] = None,
    dcgm_mapping_dir: Annotated[
        Path | None,
        typer.Option(
            help="Write dcgm-exporter HPC job-mapping files (one per GPU) here; the directory "
            "is made root's and its group's alone (2750): give dcgm-exporter that group or root."
        ),
    ] = None,
    log_max_bytes: Annotated[
        int, typer.Option(help="Cap on each task's log kept on the node.", min=4096)
    ] = 64 * 1024 * 1024,
    log_max_rate: Annotated[
        int,
        typer.Option(
            help="Bytes per second a task may write to its log (after a short burst); a job "
            "printing faster waits on its writes.",
            min=4096,
        ),
    ] = 64 * 1024 * 1024,
    output_drain_s: Annotated[
        float,
        typer.Option(
            help="Seconds an ended task's leftover child processes may keep its output open "
            "before the task is reported ended anyway.",
            min=0,
        ),
    ] = 5.0,
    time_limit_grace_s: Annotated[
        float, typer.Option(help="Seconds between SIGTERM and SIGKILL at the time limit.", min=0)
    ] = 30.0,
    isolation: Annotated[
        str,
        typer.Option(
            help="strict: each task as its org's uid, in its own cgroup and mount namespace, "
            "seeing only its GPUs (needs root). none: tasks run unconfined as the agent's user "
            "(single-tenant or demo nodes; the server keeps isolation-requiring orgs off them).",
            envvar="FAIRGPU_AGENT_ISOLATION",
        ),
    ] = "strict",
    seccomp: Annotated[
        str,
        typer.Option(
            help="on: strict tasks run under a seccomp filter refusing the system calls a "
            "training job has no use for and that widen the kernel surface a task can attack "
            "(bpf, io_uring, user namespaces, ...; docs/ISOLATION.md). off: every call their "
            "uid allows. docker and podman containers get their runtime's default profile.",
            envvar="FAIRGPU_AGENT_SECCOMP",
        ),
    ] = "on",
    netns: Annotated[
        bool,
        typer.Option(
            "--netns/--no-netns",
            help="Run tasks that ask for a private network (submit --network private, the "
            "default for single-node jobs) in a network namespace of their own, where the node "
            "can (root, pasta from the passt package, iproute2); --no-netns: never.",
            envvar="FAIRGPU_AGENT_NETNS",
        ),
    ] = True,
    wall_check_interval_s: Annotated[
        float,
        typer.Option(
            help="Seconds between two periodic checks of the nftables wall of the private "
            "tasks' networks, which put it back where anything (nft flush ruleset, a firewall "
            "reload) removed or changed it. The agent also checks at once on every change "
            "nft monitor reports; the periodic check is the backstop should the monitor miss "
            "one.",
            min=0.1,
        ),
    ] = 5.0,
    task_flow_limit: Annotated[
        int,
        typer.Option(
            help="The connections and UDP flows a private task's network, or one org's uid on "
            "the host network, may hold at once in the node's connection tracking table; past "
            "it their new flows are refused and other orgs' and the node's still open.",
            min=16,
            envvar="FAIRGPU_AGENT_TASK_FLOW_LIMIT",
        ),
    ] = 4096,
    node_service_port: Annotated[
        list[int] | None,
        typer.Option(
            help="A TCP port of the node's own services that no task may connect to on the "
            "node's addresses (repeatable; replaces the default, 5555 for DCGM's host engine "
            "and 6666 for Fabric Manager's API, which authenticate nobody; 0 alone: none). "
            "Needs the nftables wall (private task networks).",
            min=0,
            max=65535,
        ),
    ] = None,
    task_uid_base: Annotated[
        int,
        typer.Option(
            help="Tasks of org N run as uid and gid BASE+N; the range must be unused on the "
            "host (no /etc/passwd entry needed).",
            min=1000,
            envvar="FAIRGPU_AGENT_TASK_UID_BASE",
        ),
    ] = 200_000,
    org_uid: Annotated[
        list[str] | None,
        typer.Option(help="ORG=UID: this org's tasks run as UID (repeatable; wins over the base)."),
    ] = None,
    org_root: Annotated[
        list[str] | None,
        typer.Option(
            help="A directory an org's jobs may work in, {org} standing for its name, e.g. "
            "'/data/{org}' (repeatable). A job's workdir elsewhere fails at start.",
        ),
    ] = None,
    task_dir_root: Annotated[
        Path | None,
        typer.Option(
            help="Where each task gets its own directory and HOME (default: beside "
            "the state directory, STATE-tasks)."
        ),
    ] = None,
    mem_per_gpu: Annotated[
        str | None,
        typer.Option(
            help="Memory limit of a task per GPU, e.g. 120G, unless its job asks (submit "
            "--mem). Default and most: the node's memory less its reserve, divided by its GPUs.",
        ),
    ] = None,
    node_memory_reserve_bytes: Annotated[
        int | None,
        typer.Option(
            help="Memory kept for the node itself (kernel, page cache, agent, sshd, container "
            "runtime): tasks' limits share the rest. Default: 5% of the node's memory, at least "
            "4 GiB, at most half.",
            min=0,
        ),
    ] = None,
    task_pids_max: Annotated[
        int,
        typer.Option(
            help="Most processes and threads one task may have; never more than its GPUs' "
            "share of three quarters of the node's pid space.",
            min=16,
        ),
    ] = 8192,
    cgroup_parent: Annotated[
        str, typer.Option(help="Name of the cgroup holding every task's cgroup.")
    ] = "fairgpu",
    gpu_dev_dir: Annotated[
        Path, typer.Option(help="Where the GPU device files (nvidiaN) are.")
    ] = Path("/dev"),
    task_disk_max_bytes: Annotated[
        int | None,
        typer.Option(
            help="Most of the node's local disk one task may hold in its directory (files it "
            "deleted but keeps open included); over it the task ends FAILED 'disk limit'. "
            "Default: no limit of its own.",
            min=1,
        ),
    ] = None,
    task_disk_max_files: Annotated[
        int, typer.Option(help="Most files and directories one task's directory may hold.", min=1)
    ] = 500_000,
    node_disk_reserve_bytes: Annotated[
        int | None,
        typer.Option(
            help="Free space kept on the task directories' disk: under it the task holding the "
            "most is ended. Default: 5% of that disk; 0: none.",
            min=0,
        ),
    ] = None,
    disk_check_interval_s: Annotated[
        float, typer.Option(help="Seconds between two measures of the tasks' disk use.", min=0.1)
    ] = 10.0,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            help="CA bundle the server's certificate is checked against.",
            envvar="FAIRGPU_AGENT_CA_FILE",
        ),
    ] = None,
    client_cert: Annotated[
        Path | None,
        typer.Option(
            help="This node's TLS certificate, for servers that ask for one.",
            envvar="FAIRGPU_AGENT_CLIENT_CERT",
        ),
    ] = None,
    client_key: Annotated[
        Path | None,
        typer.Option(
            help="The key of --client-cert (if not in the same file).",
            envvar="FAIRGPU_AGENT_CLIENT_KEY",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(help="Allow plain http:// to another machine (credentials in clear)."),
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Register this node, report its GPUs and run the tasks the server gives it."""
    from agents.container import RUNTIMES
    from agents.daemon import AgentConfig, AgentError
    from agents.disk import DiskConfig
    from agents.gpu import GpuBackendError
    from agents.isolation import IsolationConfig, IsolationUnavailable
    from agents.runner import RunnerConfig
    from cli.parse import parse_memory
    from protocol.transport import tls_context

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if container_runtime is not None and container_runtime not in RUNTIMES:
        fail(f"--container-runtime must be one of {', '.join(RUNTIMES)}", 2)
    if isolation not in ("strict", "none"):
        fail("--isolation must be strict or none", 2)
    if seccomp not in ("on", "off"):
        fail("--seccomp must be on or off", 2)
    refusal = plain_http_refusal(server)
    if refusal and not insecure:
        fail(refusal, 2)
    if client_key is not None and client_cert is None:
        fail("--client-key needs --client-cert", 2)
    if os.getpid() == 1:
        logging.getLogger("fairgpu.agent").warning(
            "the agent is process 1 of its pid namespace: it does not reap the processes its "
            "tasks leave behind, which stay zombies, each holding a pid of the node's and of "
            "the tasks' pid budget until none can start; run it under an init (the image's "
            "tini, docker run --init, or systemd)"
        )
    if isolation == "none":
        logging.getLogger("fairgpu.agent").warning(
            "isolation none: tasks run unconfined as this user and can see and signal each "
            "other; the server will not place jobs of orgs that require isolation here"
        )
    node_name = name or _default_name()
    config = AgentConfig(
        server=server,
        state_dir=state_dir or Path("fairgpu-state") / f"agent-{node_name}",
        name=node_name,
        site=site,
        domain=domain,
        join_token=join_token,
        address=address,
        runner=RunnerConfig(
            cuda_by_uuid=cuda_uuids,
            container_runtime=container_runtime,
            container_binary=container_binary,
            container_pause_image=container_pause_image,
            exec_helper=exec_helper.absolute() if exec_helper else None,
            time_limit_grace_s=time_limit_grace_s,
            log_max_bytes=log_max_bytes,
            log_max_rate_bytes_per_s=log_max_rate,
            output_drain_s=output_drain_s,
            disk=DiskConfig(
                task_max_bytes=task_disk_max_bytes,
                task_max_files=task_disk_max_files,
                node_reserve_bytes=node_disk_reserve_bytes,
                check_interval_s=disk_check_interval_s,
            ),
        ),
        dcgm_mapping_dir=dcgm_mapping_dir,
        isolation=IsolationConfig(
            mode="strict" if isolation == "strict" else "none",
            task_root=task_dir_root.absolute() if task_dir_root else None,
            task_uid_base=task_uid_base,
            org_uids=_org_uids(org_uid or []),
            org_roots=tuple(org_root or ()),
            memory_per_gpu_bytes=parse_memory(mem_per_gpu) if mem_per_gpu else None,
            node_memory_reserve_bytes=node_memory_reserve_bytes,
            pids_max=task_pids_max,
            cgroup_parent=cgroup_parent,
            dev_dir=gpu_dev_dir,
            network_namespaces=netns,
            seccomp=seccomp == "on",
            wall_check_interval_s=wall_check_interval_s,
            task_flow_limit=task_flow_limit,
            node_service_ports=_service_ports(node_service_port),
        ),
    )
    try:
        asyncio.run(
            run_agent(
                config,
                simulate=simulate,
                metrics_port=metrics_port,
                metrics_addr=metrics_addr,
                metrics_token=metrics_token,
                tls=tls_context(ca_file=ca_file, client_cert=client_cert, client_key=client_key),
            )
        )
    except (AgentError, GpuBackendError, IsolationUnavailable, ValueError, OSError) as exc:
        fail(str(exc))


def _service_ports(given: list[int] | None) -> tuple[int, ...]:
    """`--node-service-port`s: the default where none is given, none for a lone 0."""
    from agents.netwall import NODE_SERVICE_PORTS

    if not given:
        return NODE_SERVICE_PORTS
    return tuple(sorted({port for port in given if port}))


def _org_uids(pairs: list[str]) -> dict[str, int]:
    uids: dict[str, int] = {}
    for pair in pairs:
        org, _, uid = pair.partition("=")
        if not org or not uid.isdigit() or int(uid) < 1000:
            fail(f"--org-uid {pair!r}: expected ORG=UID with a uid of 1000 or more", 2)
        uids[org] = int(uid)
    return uids


async def run_agent(
    config: AgentConfig,
    *,
    simulate: str | None,
    metrics_port: int | None,
    metrics_addr: str,
    metrics_token: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Build the agent from its parts and run it until SIGTERM or SIGINT."""
    from agents.client import AgentClient
    from agents.daemon import Agent
    from agents.gpu import GpuBackend, SimulatedBackend, open_backend, parse_simulate_spec
    from agents.metrics import AgentMetrics

    config.state_dir.mkdir(parents=True, exist_ok=True)
    backend: GpuBackend
    if simulate:
        backend = SimulatedBackend(
            parse_simulate_spec(simulate),
            seed=f"{config.site}/{config.name}",
            faults_file=config.state_dir / "simulate-faults",
        )
    else:
        backend = open_backend(None)
    metrics = AgentMetrics(config.name, backend.devices())
    if metrics_port is not None:
        metrics.serve_when_free(metrics_port, metrics_addr, token=metrics_token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = AgentClient(config.server, tls=tls, privileged_source_port=os.geteuid() == 0)
    try:
        await Agent(config, backend, client, metrics=metrics).run(stop)
    finally:
        await client.aclose()
        backend.close()
