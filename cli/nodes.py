"""Nodes and their GPUs: `node list|show|drain|resume` (like sinfo and scontrol update)."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

import typer

from cli.client import Client, connect
from cli.common import fail
from cli.output import (
    Column,
    Format,
    NoHeadersOption,
    OutputOption,
    gib,
    print_data,
    relative,
    render,
)

node_app = typer.Typer(
    help="GPU nodes: list, drain, resume, approve, revoke, delete (platform admins change).",
    no_args_is_help=True,
)

NodeArg = Annotated[str, typer.Argument(help="Node name or id.", show_default=False)]


def _types(node: dict[str, Any]) -> str:
    counts = Counter(g["model"] for g in node.get("gpus") or [])
    return ",".join(f"{n}x{model}" for model, n in sorted(counts.items())) or "-"


NODE_COLUMNS = [
    Column("ID", lambda n: n["id"], justify="right"),
    Column("NAME", lambda n: n["name"]),
    Column("SITE", lambda n: n["site"]),
    Column("STATE", lambda n: n["state"]),
    Column("GPUS", _types),
    Column("ALLOC", lambda n: f"{n['gpus_allocated']}/{n['gpus_total']}", justify="right"),
    Column("HEALTHY", lambda n: f"{n['gpus_healthy']}/{n['gpus_total']}", justify="right"),
    Column("HEARTBEAT", lambda n: relative(n.get("last_heartbeat_at"))),
    Column("DOMAIN", lambda n: n.get("domain"), wide_only=True),
    Column("AGENT", lambda n: n.get("agent_version"), wide_only=True),
    Column("ISOLATION", lambda n: n.get("isolation"), wide_only=True),
    Column("MEM/GPU", lambda n: _share(n.get("memory_per_gpu_bytes")), wide_only=True),
    Column("REASON", lambda n: n.get("state_reason"), wide_only=True),
]


def _share(memory_per_gpu_bytes: int | None) -> str:
    """The memory a job's `--mem` may ask per GPU here; "-" where the agent reported none."""
    if memory_per_gpu_bytes is None:
        return "-"
    return f"{memory_per_gpu_bytes / 2**30:.1f}GiB"


def _node_id(client: Client, ref: str) -> int:
    if ref.isdigit():
        return int(ref)
    found = [n for n in client.get("/v1/nodes", name=ref)["data"] if n["name"] == ref]
    if not found:
        fail(f"node {ref!r} not found", 5)
    return int(found[0]["id"])


@node_app.command("list")
def node_list(output: OutputOption = Format.TABLE, no_headers: NoHeadersOption = False) -> None:
    """Every node with its state, GPUs, allocation and last heartbeat."""
    with connect("node list") as client:
        nodes = client.get_all("/v1/nodes")
    render(nodes, NODE_COLUMNS, output, no_headers=no_headers, empty="no nodes")


@node_app.command("show")
def node_show(node: NodeArg, output: OutputOption = Format.TABLE) -> None:
    """One node and each of its GPUs (health, memory, the job it runs, last sample)."""
    with connect("node show") as client:
        body = client.get(f"/v1/nodes/{_node_id(client, node)}")
    if output in (Format.JSON, Format.YAML):
        print_data(body, output)
        return
    render([body], NODE_COLUMNS, Format.WIDE)
    typer.echo("")
    render(
        body["gpus"],
        [
            Column("GPU", lambda g: g["index"], justify="right"),
            Column("MODEL", lambda g: g["model"]),
            Column("MEMORY", lambda g: gib(g["memory_bytes"]), justify="right"),
            Column("HEALTH", lambda g: g["health"]),
            Column(
                "JOB",
                lambda g: (
                    g.get("allocated_job_id") or ("other org" if g.get("allocated") else None)
                ),
                justify="right",
            ),
            Column("UTIL", lambda g: _sample(g, "utilization_ratio", pct=True), justify="right"),
            Column("TEMP", lambda g: _sample(g, "temperature_c"), justify="right"),
            Column("UUID", lambda g: g["uuid"]),
        ],
        output,
    )


def _sample(gpu: dict[str, Any], key: str, pct: bool = False) -> str:
    sample = gpu.get("last_sample") or {}
    value = sample.get(key)
    if not isinstance(value, int | float):
        return "-"
    return f"{value * 100:.0f}%" if pct else f"{value:.0f}"


@node_app.command("drain")
def node_drain(
    nodes: Annotated[list[str], typer.Argument(help="Node names or ids.")],
    reason: Annotated[
        str, typer.Option(help="Why (shown in `node list -o wide`).")
    ] = "drained by an administrator",
) -> None:
    """No new work on these nodes; running tasks finish."""
    with connect("node drain") as client:
        for ref in nodes:
            body = client.post(f"/v1/nodes/{_node_id(client, ref)}/drain", {"reason": reason})
            typer.echo(f"Node {body['name']}: {body['state']}")


@node_app.command("resume")
def node_resume(nodes: Annotated[list[str], typer.Argument(help="Node names or ids.")]) -> None:
    """Put drained nodes back in service."""
    with connect("node resume") as client:
        for ref in nodes:
            body = client.post(f"/v1/nodes/{_node_id(client, ref)}/resume")
            typer.echo(f"Node {body['name']}: {body['state']}")


@node_app.command("approve")
def node_approve(node: NodeArg) -> None:
    """Let the next registration of this node's name with a join token take it over (once):
    for an agent that lost its credential. A join token alone never takes over a node."""
    with connect("node approve") as client:
        body = client.post(f"/v1/nodes/{_node_id(client, node)}/approve")
    typer.echo(
        f"Node {body['name']}: one join-token registration allowed until {body['approved_until']}"
    )


@node_app.command("revoke")
def node_revoke(node: NodeArg) -> None:
    """Revoke the node's credential now; its tasks end as on a lost node (NODE_FAIL, requeue)."""
    with connect("node revoke") as client:
        body = client.post(f"/v1/nodes/{_node_id(client, node)}/revoke")
    typer.echo(f"Node {body['name']}: credential revoked, {body['state']}")


@node_app.command("delete")
def node_delete(node: NodeArg) -> None:
    """Remove a drained or down node with no running task, with its GPUs; history stays."""
    with connect("node delete") as client:
        client.delete(f"/v1/nodes/{_node_id(client, node)}")
    typer.echo(f"Deleted node {node}")
