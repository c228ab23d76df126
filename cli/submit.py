"""`fairgpu submit`: a command line, or a batch script with its directives (cli/directives.py).

`fairgpu submit train.sh ARGS` (a local file and no `--`) sends the script's text with the job;
`fairgpu submit -- ./train.sh` runs `./train.sh` as a program on the node instead. Options on
the command line win over the script's directives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from typer import _click as click  # typer's click: its contexts say where a value came from

from cli.client import connect
from cli.common import NetworkOption, fail
from cli.directives import DirectiveError, Directives, fail_directive, parse_directives
from cli.parse import (
    parse_duration,
    parse_env,
    parse_gpus,
    parse_memory,
    parse_secret_env,
)
from protocol.signals import parse_signal

MAX_SCRIPT_BYTES = 60 * 1024  # the server's bound (protocol/script.py), checked here first
RAW_ARGS = "fairgpu.args"  # cli/lazy.py keeps a command's own arguments here in ctx.meta
_COMMANDLINE = click.core.ParameterSource.COMMANDLINE


def submit(
    ctx: typer.Context,
    command: Annotated[
        list[str] | None,
        typer.Argument(
            help="The program and its arguments, or a batch script and its arguments; with "
            "--image, none runs the image's own ENTRYPOINT and CMD.",
            show_default=False,
        ),
    ] = None,
    gpus: Annotated[
        str, typer.Option("--gpus", "-G", help="GPUs per node: N or TYPE:N (e.g. H100:8).")
    ] = "1",
    name: Annotated[str | None, typer.Option("--job-name", "-J", help="Job name.")] = None,
    account: Annotated[
        str | None,
        typer.Option(
            "--account", "-A", help="Org to submit to: your own, or any (platform admins)."
        ),
    ] = None,
    nodes: Annotated[int, typer.Option("--nodes", "-N", min=1, help="Nodes (a gang).")] = 1,
    time_limit: Annotated[
        str | None,
        typer.Option("--time", "-t", help="Time limit: 1h30m, 90m, 2-00:00:00 (bare N = minutes)."),
    ] = None,
    priority: Annotated[
        str,
        typer.Option(
            "--priority",
            help="Priority class: one the server configures (FAIRGPU_POLICY_PRIORITY_CLASSES; "
            "low, normal, high by default).",
        ),
    ] = "normal",
    preemptible: Annotated[
        bool, typer.Option("--preemptible", help="May borrow idle GPUs beyond the quota.")
    ] = False,
    requeue: Annotated[
        bool | None,
        typer.Option(
            "--requeue/--no-requeue",
            help="Requeue after a preemption or a node failure (default: when --preemptible).",
        ),
    ] = None,
    signal: Annotated[
        str | None,
        typer.Option(
            "--signal",
            help="[B:]SIG[@SECONDS]: send SIG (USR1, TERM, 10...) SECONDS (default 60) before "
            "the time limit, and instead of SIGTERM when preempted; B: only to the batch shell.",
        ),
    ] = None,
    network: NetworkOption = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="K=V for the job (repeatable).")
    ] = None,
    secret_env: Annotated[
        list[str] | None,
        typer.Option(
            "--secret-env",
            help="NAME=VALUE or NAME=@file (the file's text) set in the job's environment, "
            "stored encrypted and never shown back (repeatable). @file keeps it out of `ps`.",
        ),
    ] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", help="Working directory.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="Container image.")] = None,
    site: Annotated[str | None, typer.Option("--site", help="Run in this site only.")] = None,
    mem: Annotated[
        str | None,
        typer.Option(
            "--mem", help="Memory per node: 64G, 512M, 1T (binary units; bare N = MiB, as Slurm)."
        ),
    ] = None,
    after: Annotated[
        list[int] | None, typer.Option("--after", help="Start after job N completed (afterok).")
    ] = None,
    hold: Annotated[bool, typer.Option("--hold", help="Submit held (see `release`).")] = False,
    dependency: Annotated[
        str | None,
        typer.Option(
            "--dependency",
            "-d",
            help="afterok:JOB[:JOB...], afterany:JOB, afternotok:JOB, singleton (same name in "
            "your org), joined by commas.",
        ),
    ] = None,
    array: Annotated[
        str | None,
        typer.Option(
            "--array",
            "-a",
            help="A job array: 0-99, 1,3,5-11:2, 0-99%8 (at most 8 tasks at once); each task "
            "gets FAIRGPU_ARRAY_TASK_ID. At most 10,000 tasks (and your pending-job cap).",
        ),
    ] = None,
    parsable: Annotated[bool, typer.Option("--parsable", help="Print only the job id.")] = False,
) -> None:
    """Submit a job: `fairgpu submit -G H100:8 -N 2 -t 4h -- torchrun train.py`, or a script.

    `fairgpu submit --image IMG` with no command runs the image's ENTRYPOINT and CMD, as
    `docker run IMG` does; `--image IMG -- ARGS` runs its ENTRYPOINT with ARGS.

    `fairgpu submit train.sh ARGS` submits a batch script (it must start with `#!`): its leading
    comments may hold `#FAIRGPU` lines with these options (`#FAIRGPU -G H100:8 -t 4h`) and the
    common `#SBATCH` ones (--gres, --gpus-per-node, -N, -t, -J, -A, --mem, -D, -H, -a/--array,
    -d/--dependency, --signal, --requeue, --no-requeue; -o and -e are ignored). Options given
    here win over the script's. The node runs the script's interpreter on its text, with ARGS as
    $1...; `describe --script` shows it.
    """
    if not command:
        if image is None:  # only an image has a program of its own
            from typer._click.exceptions import MissingParameter

            raise MissingParameter(ctx=ctx, param_hint="'command'", param_type="argument")
        command = []
    body: dict[str, Any] = {}
    directives = Directives()
    script_path = _script_path(ctx, command) if command else None
    if script_path is not None:
        body["script"] = _read_script(script_path)
        try:
            directives = parse_directives(body["script"], command[0])
        except DirectiveError as exc:
            raise fail_directive(exc) from None
        for note in directives.notes:
            typer.echo(f"fairgpu: note: {note}", err=True)
        command = [script_path.name, *command[1:]]

    def given(param: str, value: Any) -> Any:
        """The command line's value if it was typed there, else the directive's text."""
        if ctx.get_parameter_source(param) is _COMMANDLINE:
            return value
        return directives.last(param) if param in directives.values else value

    gres = directives.last("gres")
    if gres is not None and ctx.get_parameter_source("gpus") is not _COMMANDLINE:
        if not gres.lower().startswith("gpu"):
            raise fail_directive(DirectiveError(f"--gres={gres}: only gpu resources exist here"))
        gpus = gres
    request = parse_gpus(given("gpus", gpus))
    if request.count < 1:
        raise typer.BadParameter("at least one GPU per node", param_hint="'-G'")
    body.update(
        {
            "command": command,
            "name": given("name", name) or _default_name(command, image),
            "gpus_per_node": request.count,
            "nodes": _int(given("nodes", nodes), "-N"),
            "gpu_type": request.gpu_type,
            "priority_class": given("priority", priority),
            "preemptible": _flag(given("preemptible", preemptible)),
            "hold": _flag(given("hold", hold)),
            "env": parse_env(_many(ctx, "env", env, directives)),
            "depends_on": _after(ctx, after, directives),
        }
    )
    if secret_env:
        body["secret_env"] = parse_secret_env(secret_env)
    time_text = given("time_limit", time_limit)
    if time_text is not None:
        body["time_limit"] = parse_duration(time_text)
    mem_text = given("mem", mem)
    if mem_text is not None:
        body["memory_bytes"] = parse_memory(mem_text)
    for key, value in (("workdir", workdir), ("image", image), ("site", site)):
        value = given(key, value)
        if value is not None:
            body[key] = value
    signal_text = given("signal", signal)
    if signal_text is not None:
        try:
            body["signal"] = str(parse_signal(signal_text))
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="'--signal'") from None
    network_text = given("network", network)
    if network_text is not None:
        body["network"] = _network(network_text)
    requeue_given = given("requeue", requeue)
    if requeue_given is not None:
        body["requeue"] = _flag(requeue_given)
    if ctx.get_parameter_source("dependency") is _COMMANDLINE:
        body["dependency"] = dependency
    elif "dependency" in directives.values:
        body["dependency"] = ",".join(directives.values["dependency"])
    array_text = given("array", array)
    if array_text is not None:
        body["array"] = array_text
    org = given("account", account)
    if org is not None:
        body["org"] = org
    with connect("submit") as client:
        job = client.post("/v1/jobs", body)
    typer.echo(str(job["id"]) if parsable else f"Submitted job {job['id']}")


def _default_name(command: list[str], image: str | None) -> str:
    """The program's file name, or the image's name without its registry, tag or digest."""
    if command:
        return command[0].rsplit("/", 1)[-1][:128]
    assert image is not None
    return image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0][:128] or "job"


def _script_path(ctx: typer.Context, command: list[str]) -> Path | None:
    """The batch script `command` names: its first word is a local file and no `--` came
    before it (click drops that `--`, so the raw arguments hold one more than `command`)."""
    raw: list[str] = ctx.meta.get(RAW_ARGS, [])
    if raw.count("--") > command.count("--"):
        return None
    path = Path(command[0])
    return path if path.is_file() else None


def _read_script(path: Path) -> str:
    try:
        size = os.stat(path).st_size
        if size > MAX_SCRIPT_BYTES:
            fail(f"{path}: the script is {size} bytes; at most {MAX_SCRIPT_BYTES}", 2)
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or type(exc).__name__}", 2)
    except UnicodeDecodeError:
        fail(f"{path}: a batch script must be UTF-8 text", 2)
    if not text.startswith("#!"):
        fail(
            f"{path}: a batch script must start with a #! line (e.g. #!/bin/bash); "
            "to run it as a program on the node, put -- before it",
            2,
        )
    return text


def _network(text: str) -> str:
    if text not in ("private", "host"):
        raise typer.BadParameter(f"{text!r}: private or host", param_hint="'--network'")
    return text


def _int(value: Any, hint: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a whole number", param_hint=hint) from None
    if number < 1:
        raise typer.BadParameter(f"{number} must be at least 1", param_hint=hint)
    return number


def _flag(value: Any) -> bool:
    return value is True or value == "true"


def _many(ctx: typer.Context, param: str, value: list[str] | None, found: Directives) -> list[str]:
    if ctx.get_parameter_source(param) is _COMMANDLINE:
        return value or []
    return found.values.get(param, [])


def _after(ctx: typer.Context, after: list[int] | None, found: Directives) -> list[int]:
    """Job ids to wait for (afterok): `--after` here, else the script's `--after`."""
    if ctx.get_parameter_source("after") is _COMMANDLINE:
        return after or []
    return [_int(text, "--after") for text in found.values.get("after", [])]
