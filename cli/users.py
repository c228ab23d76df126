"""People and credentials: `login`, `whoami`, `user`, `token` and `join-token`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.client import ApiError, Client, connect, report
from cli.common import fail
from cli.config import Credentials, read_config, write_config
from cli.output import Column, Format, NoHeadersOption, OutputOption, print_data, relative, render
from cli.parse import parse_duration
from protocol.transport import plain_http_refusal

user_app = typer.Typer(help="Users of an organisation (admins).", no_args_is_help=True)
token_app = typer.Typer(help="Your API tokens.", no_args_is_help=True)
join_app = typer.Typer(
    help="Tokens that let node agents join (platform admins).", no_args_is_help=True
)

ROLES = ("member", "org-admin", "platform-admin")


def login(
    server: Annotated[
        str | None,
        typer.Option(
            help="Server URL, e.g. https://gpu.example.org (default: FAIRGPU_SERVER, else the "
            "saved one)."
        ),
    ] = None,
    token: Annotated[
        str,
        typer.Option(
            help="Your API token (asked for when not given: it stays out of shell history).",
            prompt=True,
            hide_input=True,
            envvar="FAIRGPU_TOKEN",
        ),
    ] = "",
    verify: Annotated[bool, typer.Option(help="Check the token with the server first.")] = True,
    insecure: Annotated[
        bool,
        typer.Option(help="Allow plain http:// to another machine (the token travels in clear)."),
    ] = False,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            help="CA certificates that sign the server's (default: the system's).",
            envvar="FAIRGPU_CA_FILE",
            exists=True,
            dir_okay=False,
            resolve_path=True,
        ),
    ] = None,
    client_cert: Annotated[
        Path | None,
        typer.Option(
            help="Your certificate, for a server that asks for one (mutual TLS).",
            envvar="FAIRGPU_CLIENT_CERT",
            exists=True,
            dir_okay=False,
            resolve_path=True,
        ),
    ] = None,
    client_key: Annotated[
        Path | None,
        typer.Option(
            help="The key of --client-cert, when not in the same file.",
            envvar="FAIRGPU_CLIENT_KEY",
            exists=True,
            dir_okay=False,
            resolve_path=True,
        ),
    ] = None,
) -> None:
    """Save the server and token (mode 0600); FAIRGPU_SERVER and FAIRGPU_TOKEN override them."""
    server = server or os.environ.get("FAIRGPU_SERVER") or read_config().get("server")
    if not server:
        fail("which server? run `fairgpu login --server URL` (your admin has the URL)", 2)
    if not server.startswith(("http://", "https://")):
        raise typer.BadParameter("the server URL starts with http:// or https://")
    server = server.rstrip("/")
    refusal = plain_http_refusal(server)
    if refusal and not insecure:
        fail(refusal, 2)
    if client_key is not None and client_cert is None:
        raise typer.BadParameter("needs --client-cert", param_hint="'--client-key'")
    files = {"ca_file": ca_file, "client_cert": client_cert, "client_key": client_key}
    tls_files = {name: str(path) for name, path in files.items() if path is not None}
    who = None
    if verify:
        creds = Credentials(server=server, token=token, insecure=insecure, **tls_files)
        with Client(creds) as client:
            try:
                who = client.get("/v1/users/me")
                org = client.get(f"/v1/orgs/{who['org_id']}") if who.get("org_id") else None
            except ApiError as exc:
                report(exc, "login")
    path = write_config(server, token, insecure=insecure, tls_files=tls_files)
    if who is None:
        typer.echo(f"Saved {server} and the token to {path} (not checked with the server)")
        return
    where = f" in org {org['name']}" if org else ""
    typer.echo(f"Logged in to {server} as {who['name']} ({who['role']}){where}; saved to {path}")


def whoami(output: OutputOption = Format.TABLE) -> None:
    """Who the configured token belongs to."""
    with connect() as client:
        me = client.get("/v1/users/me")
        org = client.get(f"/v1/orgs/{me['org_id']}") if me.get("org_id") else None
    if output is not Format.TABLE:
        print_data({**me, "org": org["name"] if org else None}, output)
        return
    where = f" in {org['name']}" if org else ""
    typer.echo(f"{me['name']} ({me['role']}){where} at {client.server}")


USER_COLUMNS = [
    Column("ID", lambda u: u["id"], justify="right"),
    Column("NAME", lambda u: u["name"]),
    Column("ORG", lambda u: u.get("org")),
    Column("ROLE", lambda u: u["role"]),
    Column("CREATED", lambda u: relative(u["created_at"])),
    Column(
        "DISABLED",
        lambda u: relative(u["disabled_at"]) if u.get("disabled_at") else "-",
        wide_only=True,
    ),
]


def _with_org_names(client: Client, users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    orgs = {o["id"]: o["name"] for o in client.get("/v1/orgs")["data"]}
    return [{**u, "org": orgs.get(u.get("org_id"), u.get("org_id"))} for u in users]


@user_app.command("create")
def user_create(
    name: Annotated[str, typer.Argument(help="User name.")],
    org: Annotated[str | None, typer.Option(help="Org (default: yours).")] = None,
    role: Annotated[str, typer.Option(help="member, org-admin or platform-admin.")] = "member",
    token: Annotated[
        bool, typer.Option("--token", help="Also issue a token and print it.")
    ] = False,
    output: OutputOption = Format.TABLE,
) -> None:
    """Create a user (org admins: in their own org)."""
    if role not in ROLES:
        raise typer.BadParameter(f"one of {', '.join(ROLES)}", param_hint="'--role'")
    body: dict[str, Any] = {"name": name, "role": role}
    if org:
        body["org"] = org
    with connect("user create") as client:
        user = client.post("/v1/users", body)
        issued = (
            client.post("/v1/tokens", {"name": "cli", "user_id": user["id"]}) if token else None
        )
    if output is not Format.TABLE:
        print_data({**user, "token": issued["token"] if issued else None}, output)
        return
    typer.echo(f"Created user {user['name']} (id {user['id']}, {user['role']})")
    if issued:
        typer.echo(f"Token (shown once): {issued['token']}")


@user_app.command("list")
def user_list(output: OutputOption = Format.TABLE, no_headers: NoHeadersOption = False) -> None:
    """Users you administer."""
    with connect("user list") as client:
        listed = client.get_all("/v1/users")
        users = _with_org_names(client, listed)
    render(users, USER_COLUMNS, output, no_headers=no_headers, empty="no users")


@user_app.command("disable")
def user_disable(user_id: Annotated[int, typer.Argument(min=1, help="User id.")]) -> None:
    """Disable a user: revoke its tokens and cancel its pending jobs (running ones run on)."""
    with connect("user disable") as client:
        client.delete(f"/v1/users/{user_id}")
    typer.echo(f"Disabled user {user_id}")


TOKEN_COLUMNS = [
    Column("ID", lambda t: t["id"], justify="right"),
    Column("NAME", lambda t: t["name"]),
    Column("PREFIX", lambda t: t["prefix"]),
    Column("USER", lambda t: t.get("user_id"), justify="right"),
    Column("EXPIRES", lambda t: relative(t.get("expires_at"))),
    Column("LAST_USED", lambda t: relative(t.get("last_used_at"))),
    Column("REVOKED", lambda t: relative(t["revoked_at"]) if t.get("revoked_at") else "-"),
    Column("USES_LEFT", lambda t: t.get("uses_left"), wide_only=True),
]


def _created(token: dict[str, Any], output: Format, what: str) -> None:
    if output is not Format.TABLE:
        print_data(token, output)
        return
    typer.echo(
        f"Created {what} {token['id']} ({token['name']}), "
        f"expires {relative(token.get('expires_at'))}"
    )
    typer.echo("Secret (shown once, store it now):", err=True)
    typer.echo(token["token"])


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="What the token is for.")] = "token",
    ttl: Annotated[str | None, typer.Option(help="Lifetime, e.g. 90d (server default).")] = None,
    user_id: Annotated[
        int | None, typer.Option("--user", min=1, help="For this user (admins).")
    ] = None,
    output: OutputOption = Format.TABLE,
) -> None:
    """Issue an API token; its secret is printed once."""
    body: dict[str, Any] = {"name": name}
    if ttl:
        body["ttl"] = parse_duration(ttl)
    if user_id is not None:
        body["user_id"] = user_id
    with connect("token create") as client:
        token = client.post("/v1/tokens", body)
    _created(token, output, "token")


@token_app.command("list")
def token_list(output: OutputOption = Format.TABLE, no_headers: NoHeadersOption = False) -> None:
    """Tokens you manage (never their secrets)."""
    with connect("token list") as client:
        tokens = client.get_all("/v1/tokens")
    render(tokens, TOKEN_COLUMNS, output, no_headers=no_headers, empty="no tokens")


@token_app.command("revoke")
def token_revoke(token_id: Annotated[int, typer.Argument(min=1, help="Token id.")]) -> None:
    """Revoke a token at once."""
    with connect("token revoke") as client:
        client.delete(f"/v1/tokens/{token_id}")
    typer.echo(f"Revoked token {token_id}")


@join_app.command("create")
def join_create(
    name: Annotated[str, typer.Option(help="What the token is for.")] = "join",
    site: Annotated[
        str | None, typer.Option(help="Nodes joining with it belong to this site.")
    ] = None,
    uses: Annotated[int, typer.Option(min=1, help="How many nodes may join with it.")] = 1,
    ttl: Annotated[str, typer.Option(help="Lifetime, e.g. 12h or 7d.")] = "1d",
    output: OutputOption = Format.TABLE,
) -> None:
    """A token for `fairgpu agent --join-token`; its secret is printed once."""
    body: dict[str, Any] = {"name": name}
    if site:
        body["site"] = site
    body["uses"] = uses
    body["ttl"] = parse_duration(ttl)
    with connect("join-token create") as client:
        token = client.post("/v1/join-tokens", body)
    _created(token, output, "join token")


@join_app.command("list")
def join_list(output: OutputOption = Format.TABLE, no_headers: NoHeadersOption = False) -> None:
    """Join tokens (never their secrets)."""
    with connect("join-token list") as client:
        body = client.get("/v1/join-tokens")
    render(body["data"], TOKEN_COLUMNS, output, no_headers=no_headers, empty="no join tokens")


@join_app.command("revoke")
def join_revoke(token_id: Annotated[int, typer.Argument(min=1, help="Token id.")]) -> None:
    """Revoke a join token: no more nodes join with it."""
    with connect("join-token revoke") as client:
        client.delete(f"/v1/join-tokens/{token_id}")
    typer.echo(f"Revoked join token {token_id}")
