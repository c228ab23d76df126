"""Organisations, quotas and fair-share standing: `org`, `quota`, `share` (like sshare)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from cli.client import connect
from cli.output import (
    Column,
    Format,
    NoHeadersOption,
    OutputOption,
    human_duration,
    relative,
    render,
)
from cli.parse import parse_duration

org_app = typer.Typer(
    help="Organisations (platform admins create and delete).", no_args_is_help=True
)
quota_app = typer.Typer(help="Guaranteed GPUs and limits per GPU type.", no_args_is_help=True)

OrgArg = Annotated[str, typer.Argument(help="Org name or id.", show_default=False)]


def _quotas(org: dict[str, Any]) -> str:
    parts = []
    for q in org.get("quotas") or []:
        limit = "-" if q["limit"] is None else q["limit"]
        parts.append(f"{q['gpu_type']}:{q['guaranteed']}/{limit}")
    return " ".join(parts) or "-"


def _isolation(org: dict[str, Any]) -> str:
    if org.get("require_isolation"):
        return "required"
    return "inherited" if org.get("isolation_required") else "-"


def _network(org: dict[str, Any]) -> str:
    if org.get("require_private_network"):
        return "private"
    return "private-inherited" if org.get("private_network_required") else "-"


def _own(show: Callable[[dict[str, Any]], object]) -> Callable[[dict[str, Any]], object]:
    """A company's setting: `hidden` past the caller's tenant wall (the API sends null)."""
    return lambda org: "hidden" if org.get("settings_hidden") else show(org)


ORG_COLUMNS = [
    Column("ID", lambda o: o["id"], justify="right"),
    Column("NAME", lambda o: "  " * int(o.get("depth", 0)) + o["name"]),
    Column("SHARES", lambda o: o["shares"], justify="right"),
    Column("QUOTA(GUAR/LIMIT)", _quotas),
    Column("ISOLATION", _own(_isolation)),
    Column("MAX_PRIORITY", _own(lambda o: o.get("max_priority_class", "-"))),
    Column("MAX_PENDING", _own(lambda o: o.get("max_pending_jobs", "-")), justify="right"),
    Column(
        "IMAGES",
        _own(lambda o: ",".join(o.get("image_patterns") or []) or "any"),
        wide_only=True,
    ),
    Column("PATH", lambda o: o.get("path"), wide_only=True),
    Column("WALL", lambda o: "tenant" if o.get("tenant", True) else "group", wide_only=True),
    Column("NETWORK", _own(_network), wide_only=True),
    Column(
        "DEFAULT_TIME",
        _own(lambda o: human_duration(o.get("default_time_limit_s"))),
        wide_only=True,
    ),
    Column(
        "INTERACTIVE_MAX",
        _own(lambda o: human_duration(o.get("interactive_max_time_s"))),
        wide_only=True,
    ),
    Column(
        "INTERACTIVE_IDLE",
        _own(lambda o: human_duration(o.get("interactive_idle_timeout_s")) or "off"),
        wide_only=True,
    ),
    Column("CREATED", lambda o: relative(o["created_at"]), wide_only=True),
]


@org_app.command("create")
def org_create(
    name: Annotated[str, typer.Argument(help="Org name.")],
    parent: Annotated[str | None, typer.Option(help="Parent org (a programme).")] = None,
    shares: Annotated[float, typer.Option(min=0.0, help="Fair-share weight.")] = 1.0,
    default_time: Annotated[
        str | None, typer.Option("--default-time", help="Default job time limit (e.g. 4h).")
    ] = None,
    group: Annotated[
        bool,
        typer.Option(
            "--group",
            help="A group of its parent's tenant (a team inside a company), which the parent's "
            "members and admins see in full; by default an org is a tenant of its own, which "
            "the orgs above it see only in aggregates.",
        ),
    ] = False,
    output: OutputOption = Format.TABLE,
) -> None:
    """Create an organisation."""
    body: dict[str, Any] = {"name": name, "shares": shares}
    if group:
        body["tenant"] = False
    if parent:
        body["parent"] = parent
    if default_time:
        body["default_time_limit"] = parse_duration(default_time)
    with connect("org create") as client:
        org = client.post("/v1/orgs", body)
    if output is Format.TABLE:
        typer.echo(f"Created org {org['name']} (id {org['id']})")
    else:
        render([org], ORG_COLUMNS, output)


@org_app.command("list")
def org_list(output: OutputOption = Format.TABLE, no_headers: NoHeadersOption = False) -> None:
    """The organisation tree with shares and quotas (guaranteed/limit per GPU type)."""
    with connect("org list") as client:
        body = client.get("/v1/orgs")
    render(body["data"], ORG_COLUMNS, output, no_headers=no_headers, empty="no organisations")


@org_app.command("get")
def org_get(org: OrgArg, output: OutputOption = Format.WIDE) -> None:
    """One organisation: shares, quotas, isolation requirement and allowed images."""
    with connect("org get") as client:
        body = client.get(f"/v1/orgs/{org}")
    render([body], ORG_COLUMNS, output, data=body)


@org_app.command("update")
def org_update(
    org: OrgArg,
    shares: Annotated[float | None, typer.Option(min=0.0, help="Fair-share weight.")] = None,
    default_time: Annotated[
        str | None, typer.Option("--default-time", help="Default job time limit (e.g. 4h).")
    ] = None,
    require_isolation: Annotated[
        bool | None,
        typer.Option(
            "--require-isolation/--no-require-isolation",
            help="Run its jobs (and those of the orgs below it) only on nodes with strict "
            "isolation.",
            show_default=False,
        ),
    ] = None,
    require_private_network: Annotated[
        bool | None,
        typer.Option(
            "--require-private-network/--no-require-private-network",
            help="Run every one-node job of it (and of the orgs below it) in a network of its "
            "own, refusing --network host for one; multi-node jobs still use their nodes' "
            "network.",
            show_default=False,
        ),
    ] = None,
    tenant: Annotated[
        bool | None,
        typer.Option(
            "--tenant/--group",
            help="A tenant of its own (a company: the orgs above it see it only in aggregates, "
            "never its users' names), or a group of its parent's tenant (seen in full by the "
            "parent's members and admins).",
            show_default=False,
        ),
    ] = None,
    images: Annotated[
        list[str] | None,
        typer.Option(
            "--images",
            help="Images its jobs may use, as shell patterns (registry.example/acme/*); "
            "repeatable; --images '' allows any image.",
        ),
    ] = None,
    max_priority: Annotated[
        str | None,
        typer.Option(
            "--max-priority",
            help="Highest priority class its members may submit at, one the server configures "
            "(FAIRGPU_POLICY_PRIORITY_CLASSES; low, normal, high by default); 'default' "
            "returns to the server's default.",
        ),
    ] = None,
    max_pending_jobs: Annotated[
        int | None,
        typer.Option(
            "--max-pending-jobs",
            min=-1,
            help="Most pending jobs it may have at once; -1 returns to the server's default.",
        ),
    ] = None,
    interactive_max_time: Annotated[
        str | None,
        typer.Option(
            "--interactive-max-time",
            help="Longest time limit of its interactive jobs (--pty, --jupyter), e.g. 8h; the "
            "orgs below it that set none take it too; 'default' returns to its parent's or the "
            "server's.",
        ),
    ] = None,
    interactive_idle_timeout: Annotated[
        str | None,
        typer.Option(
            "--interactive-idle-timeout",
            help="How long its interactive jobs may go without input and without GPU use before "
            "they end (a warning reaches their terminal first), e.g. 30m; 'off': never; the orgs "
            "below it that set none take it too; 'default' returns to its parent's or the "
            "server's.",
        ),
    ] = None,
    output: OutputOption = Format.TABLE,
) -> None:
    """Change an organisation (platform admins)."""
    body: dict[str, Any] = {}
    if shares is not None:
        body["shares"] = shares
    if default_time:
        body["default_time_limit"] = parse_duration(default_time)
    if require_isolation is not None:
        body["require_isolation"] = require_isolation
    if require_private_network is not None:
        body["require_private_network"] = require_private_network
    if tenant is not None:
        body["tenant"] = tenant
    if images is not None:
        body["image_patterns"] = [p for p in images if p.strip()]
    if max_priority is not None:
        body["max_priority_class"] = None if max_priority == "default" else max_priority
    if max_pending_jobs is not None:
        body["max_pending_jobs"] = None if max_pending_jobs < 0 else max_pending_jobs
    if interactive_max_time is not None:
        body["interactive_max_time"] = (
            None if interactive_max_time == "default" else parse_duration(interactive_max_time)
        )
    if interactive_idle_timeout is not None:
        body["interactive_idle_timeout"] = {"default": None, "off": 0}.get(interactive_idle_timeout)
        if interactive_idle_timeout not in ("default", "off"):
            body["interactive_idle_timeout"] = parse_duration(interactive_idle_timeout)
    if not body:
        raise typer.BadParameter("nothing to change: give at least one option")
    with connect("org update") as client:
        updated = client.patch(f"/v1/orgs/{org}", body)
    if output is Format.TABLE:
        typer.echo(f"Updated org {updated['name']}")
    else:
        render([updated], ORG_COLUMNS, output)


@org_app.command("delete")
def org_delete(org: OrgArg) -> None:
    """Delete an organisation that has no users, jobs or children left."""
    with connect("org delete") as client:
        client.delete(f"/v1/orgs/{org}")
    typer.echo(f"Deleted org {org}")


QUOTA_COLUMNS = [
    Column("GPU_TYPE", lambda q: q["gpu_type"]),
    Column("GUARANTEED", lambda q: q["guaranteed"], justify="right"),
    Column("LIMIT", lambda q: q["limit"], justify="right"),
]


@quota_app.command("set")
def quota_set(
    org: OrgArg,
    gpu_type: Annotated[str, typer.Option("--gpu-type", help="GPU type, e.g. H100.")],
    guaranteed: Annotated[int, typer.Option(min=0, help="Guaranteed GPUs (nominal quota).")],
    limit: Annotated[
        int | None, typer.Option(min=0, help="Most GPUs it may hold, borrowing included.")
    ] = None,
) -> None:
    """Set an org's guaranteed GPUs and limit for one GPU type."""
    if limit is not None and limit < guaranteed:
        raise typer.BadParameter("--limit must be at least --guaranteed", param_hint="'--limit'")
    with connect("quota set") as client:
        q = client.put(
            f"/v1/orgs/{org}/quota/{gpu_type}", {"guaranteed": guaranteed, "limit": limit}
        )
    shown = "none" if q["limit"] is None else q["limit"]
    typer.echo(f"Quota of {org} for {q['gpu_type']}: guaranteed {q['guaranteed']}, limit {shown}")


@quota_app.command("show")
def quota_show(
    org: OrgArg, output: OutputOption = Format.TABLE, no_headers: NoHeadersOption = False
) -> None:
    """An org's quota per GPU type."""
    with connect("quota show") as client:
        rows = client.get(f"/v1/orgs/{org}/quota")
    render(rows, QUOTA_COLUMNS, output, no_headers=no_headers, empty="no quota set")


def share(output: OutputOption = Format.TABLE, no_headers: NoHeadersOption = False) -> None:
    """Fair-share standing, like sshare: shares, decayed usage, factor, time to recover."""
    with connect("share") as client:
        body = client.get("/v1/shares")
        depth = {o["id"]: o.get("depth", 0) for o in client.get("/v1/orgs")["data"]}
    render(
        body["data"],
        [
            Column("ORG", lambda r: "  " * int(depth.get(r["org_id"], 0)) + r["org"]),
            Column("SHARES", lambda r: r["shares"], justify="right"),
            Column("NORM_SHARES", lambda r: f"{r['shares_norm']:.3f}", justify="right"),
            Column(
                "GPU_HOURS", lambda r: f"{r['decayed_usage_gpu_s'] / 3600:.2f}", justify="right"
            ),
            Column("NORM_USAGE", lambda r: f"{r['usage_norm']:.3f}", justify="right"),
            Column("FAIRSHARE", lambda r: f"{r['fairshare_factor']:.3f}", justify="right"),
            Column(
                "RECOVERS",
                lambda r: relative(r.get("recovers_at")) if r.get("recovers_at") else "-",
            ),
        ],
        output,
        no_headers=no_headers,
        data=body,
        empty="no organisations",
    )
    if output in (Format.TABLE, Format.WIDE) and not no_headers:
        typer.echo(f"(usage decays with a half-life of {human_duration(body['half_life_s'])})")
