"""Registers the user and admin commands on the `fairgpu` app (kept out of the shared main.py)."""

from __future__ import annotations

import typer

from cli import demo, history, jobs, nodes, orgs, usage, users

# Everything after the first word of the command belongs to it: `submit -- python x.py --lr 3`
# and `submit python x.py --lr 3` both work.
_COMMAND_LINE = {"allow_interspersed_args": False}


def register(app: typer.Typer) -> None:
    app.command("login")(users.login)
    app.command("whoami")(users.whoami)
    app.command("submit", context_settings=_COMMAND_LINE)(jobs.submit)
    app.command("queue")(jobs.queue)
    app.command("describe")(jobs.describe)
    app.command("explain")(jobs.explain)
    app.command("logs")(history.logs)
    app.command("cancel")(jobs.cancel)
    app.command("hold")(jobs.hold)
    app.command("release")(jobs.release)
    app.command("history")(history.history)
    app.command("share")(orgs.share)
    app.command("usage")(usage.usage)
    app.add_typer(orgs.org_app, name="org")
    app.add_typer(orgs.quota_app, name="quota")
    app.add_typer(users.user_app, name="user")
    app.add_typer(users.token_app, name="token")
    app.add_typer(users.join_app, name="join-token")
    app.add_typer(nodes.node_app, name="node")
    app.command("demo")(demo.demo)
