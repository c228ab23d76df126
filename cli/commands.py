"""Every `fairgpu` command: where it lives and its one-line help (cli/lazy.py loads it on use)."""

from __future__ import annotations

from cli.lazy import Lazy

# Everything after the first word of the command belongs to it: `submit -- python x.py --lr 3`
# and `submit python x.py --lr 3` both work.
_COMMAND_LINE = {"allow_interspersed_args": False}

COMMANDS: dict[str, Lazy] = {
    "login": Lazy(
        "cli.users",
        "login",
        "Save the server and token (mode 0600); FAIRGPU_SERVER and FAIRGPU_TOKEN override them.",
    ),
    "whoami": Lazy("cli.users", "whoami", "Who the configured token belongs to."),
    "submit": Lazy(
        "cli.submit",
        "submit",
        "Submit a job: `fairgpu submit -G H100:8 -N 2 -t 4h -- torchrun train.py`, or a script.",
        _COMMAND_LINE,
    ),
    "run": Lazy(
        "cli.interactive",
        "run",
        "Run a program on allocated GPUs with this terminal attached: `run --pty -- bash`.",
        _COMMAND_LINE,
    ),
    "attach": Lazy(
        "cli.interactive",
        "attach",
        "Attach to a running interactive job's terminal again, or open a new shell in a job.",
    ),
    "port-forward": Lazy(
        "cli.forward",
        "port_forward",
        "Forward a local port to a port the job listens on: `port-forward 42 8888[:8888]`.",
    ),
    "queue": Lazy(
        "cli.jobs", "queue", "The queue, like squeue: running and pending jobs with why each waits."
    ),
    "describe": Lazy(
        "cli.jobs", "describe", "Everything about one job: its request, its state and its history."
    ),
    "explain": Lazy(
        "cli.jobs",
        "explain",
        "Why a job waits, every reason with its numbers, and when it should start.",
    ),
    "logs": Lazy(
        "cli.history",
        "logs",
        "A job's output (stdout and stderr), as its node shipped it to the server.",
    ),
    "cancel": Lazy(
        "cli.jobs",
        "cancel",
        "Cancel jobs: pending ones at once, running ones after SIGTERM and the grace period.",
    ),
    "hold": Lazy("cli.jobs", "hold", "Keep pending jobs from starting until released."),
    "update": Lazy(
        "cli.jobs",
        "update",
        "Change a pending job (or every pending task of an array): time limit, name, hold.",
    ),
    "release": Lazy("cli.jobs", "release", "Let held jobs be scheduled again."),
    "history": Lazy(
        "cli.history", "history", "Finished jobs, like sacct: state, exit code, run time, GPUs."
    ),
    "share": Lazy(
        "cli.orgs",
        "share",
        "Fair-share standing, like sshare: shares, decayed usage, factor, time to recover.",
    ),
    "usage": Lazy(
        "cli.usage",
        "usage",
        "GPU-hours allocated, busy and billed, energy, and GPU-hours lost to preemption.",
    ),
    "org": Lazy("cli.orgs", "org_app", "Organisations (platform admins create and delete)."),
    "quota": Lazy("cli.orgs", "quota_app", "Guaranteed GPUs and limits per GPU type."),
    "user": Lazy("cli.users", "user_app", "Users of an organisation (admins)."),
    "token": Lazy("cli.users", "token_app", "Your API tokens."),
    "join-token": Lazy(
        "cli.users", "join_app", "Tokens that let node agents join (platform admins)."
    ),
    "node": Lazy(
        "cli.nodes",
        "node_app",
        "GPU nodes: list, drain, resume, approve, revoke, delete (platform admins change).",
    ),
    "demo": Lazy(
        "cli.demo",
        "demo",
        "Run the whole system here: a server, four simulated GPU nodes, three orgs, a workload.",
    ),
    "bench": Lazy("cli.bench", "app", "Benchmarks; each prints JSON lines on stdout."),
    "simulate": Lazy(
        "cli.simulate",
        "simulate",
        "Simulate a trace (or the server's own history) under each policy and write a report.",
    ),
    "agent": Lazy(
        "cli.agent",
        "agent",
        "Register this node, report its GPUs and run the tasks the server gives it.",
    ),
    "db": Lazy("cli.db", "app", "Database schema: upgrade, downgrade, check."),
    "server": Lazy(
        "cli.server", "server", "Serve the API (and run the scheduler) until interrupted."
    ),
    "admin": Lazy("cli.admin", "app", "Administration directly on the database."),
}
