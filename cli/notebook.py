"""`fairgpu run --jupyter`: a notebook server on allocated GPUs, reached through a port-forward.

The job (interactive: the org's interactive maximum time binds it) runs a small launcher that
starts `jupyter lab`, or `jupyter notebook` when only that is installed, bound to 127.0.0.1 on
a free port, and says `fairgpu-jupyter: KIND PORT` in its output once the server answers. The
CLI then forwards a local port to it (cli/forward.py) and prints the local URL.

The token is random, made here, and reaches the notebook only through its environment
(`JUPYTER_TOKEN`, which jupyter reads): never on a command line, where any process on the node
could read it, and replaced by `<token>` in the job's output. It travels as a secret variable
(stored encrypted, never shown by the API) when the server keeps secrets; otherwise as a plain
variable, which the org's members can read, and the CLI says so. Jobs of other orgs on the node
could reach the loopback port, but not without the token.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Any

import typer

from cli.client import ApiError, Client, report
from cli.common import fail

START_GRACE_S = 30.0
"""How long a job that runs may take before its terminal can be reached."""
READY_WAIT_S = 300.0
"""How long the notebook may take to answer once its job runs (installing kernels...)."""
_READY = re.compile(r"^fairgpu-jupyter: (lab|notebook) (\d+)\s*$", re.MULTILINE)
_MISSING = "fairgpu-jupyter: missing"

LAUNCHER = r"""
if command -v jupyter-lab >/dev/null 2>&1; then kind=lab
elif command -v jupyter-notebook >/dev/null 2>&1; then kind=notebook
else
  echo "fairgpu-jupyter: missing: neither jupyter lab nor jupyter notebook is installed in" \
       "the job's environment (pip install jupyterlab)"
  exit 127
fi
py=$(command -v python3 || command -v python)
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
"jupyter-$kind" --no-browser --ip=127.0.0.1 --port="$port" --port-retries=0 2>&1 \
  | sed -u "s/$JUPYTER_TOKEN/<token>/g" &
"$py" -c '
import socket, sys, time
for _ in range(3000):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit(1)
' "$port" && echo "fairgpu-jupyter: $kind $port"
wait
"""


def notebook_body(body: dict[str, Any], token: str, *, secret: bool) -> dict[str, Any]:
    """The `run` submission turned into a notebook job (`body` has the user's options)."""
    out = {**body, "command": ["sh", "-c", LAUNCHER, "fairgpu-jupyter"], "interactive": True}
    out["name"] = body.get("name") or "jupyter"
    where = "secret_env" if secret else "env"
    out[where] = {**out.get(where, {}), "JUPYTER_TOKEN": token}
    return out


def submit_notebook(client: Client, body: dict[str, Any]) -> tuple[str, str]:
    """Submit; the job's id and its token. Without secrets on the server, the token goes in
    the plain environment, with a warning."""
    token = secrets.token_urlsafe(32)
    try:
        job = client.post("/v1/jobs", notebook_body(body, token, secret=True))
    except ApiError as exc:
        if exc.status != 422 or "stores no secrets" not in exc.detail:
            raise
        typer.echo(
            "fairgpu: warning: the server keeps no secrets, so the notebook's token is in the "
            "job's environment, which your org's members can read",
            err=True,
        )
        job = client.post("/v1/jobs", notebook_body(body, token, secret=False))
    return str(job["id"]), token


def start_terminal(job_id: str) -> None:
    """Attach to the job's terminal once and leave: its program starts when a first client has
    given the window size (agents/ptyhost.py), rather than after the unattended wait. The
    notebook's console stays there for `fairgpu attach`."""
    from cli.config import resolve
    from cli.terminal import open_stream
    from protocol.streams import Resize, control_text

    creds = resolve()
    assert creds is not None
    deadline = time.monotonic() + START_GRACE_S
    while True:
        try:
            websocket = open_stream(creds, job_id, 0)
            break
        except ApiError as exc:
            if exc.status != 409 or time.monotonic() > deadline:
                report(exc, f"run --jupyter {job_id}", server=creds.server)
        time.sleep(0.5)
    with websocket:
        websocket.send(control_text(Resize(type="resize", rows=50, cols=200)))


def wait_ready(client: Client, job_id: str) -> tuple[str, int]:
    """(kind, port) once the job's notebook answers; a clear error if it cannot start."""
    start_terminal(job_id)
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        if time.monotonic() > deadline:
            fail(f"job {job_id}: the notebook did not answer within {READY_WAIT_S:g} s")
        # The state before the log: a job seen ended has its whole log once `eof` says so.
        job = client.get(f"/v1/jobs/{job_id}")
        piece = client.get(f"/v1/jobs/{job_id}/logs", tail=64 * 1024)
        output = piece["data"]
        if found := _READY.search(output):
            return found.group(1), int(found.group(2))
        for line in output.splitlines():
            if line.startswith(_MISSING):
                fail(f"job {job_id}: {line.removeprefix(_MISSING + ': ').strip()}")
        if job["state"] not in ("PENDING", "STARTING", "RUNNING") and piece["eof"]:
            fail(f"job {job_id} ended {job['state']} before its notebook answered")
        time.sleep(0.5)


def serve_notebook(job_id: str, token: str, kind: str, remote: int, address: str) -> None:
    """Forward a free local port to the notebook and print its URL, until Ctrl-C."""
    from cli.config import resolve
    from cli.forward import Forwarder

    creds = resolve()
    assert creds is not None

    def ready(port: int) -> None:
        page = "lab" if kind == "lab" else "tree"
        typer.echo(f"Jupyter {kind} of job {job_id}: http://{address}:{port}/{page}?token={token}")
        typer.echo(f"Ctrl-C stops forwarding; the job runs on until `fairgpu cancel {job_id}`.")

    try:
        fatal = asyncio.run(Forwarder(creds, job_id, remote, 0).serve(address, 0, ready))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    if fatal is not None:
        report(fatal, f"run --jupyter {job_id}", server=creds.server)
