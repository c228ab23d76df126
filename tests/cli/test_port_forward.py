"""`fairgpu port-forward` end to end: the real server (uvicorn on loopback), a real `fairgpu
agent` process and the CLI as a real process, on SQLite and PostgreSQL. Two orgs' jobs share the
one node (and its network): a forward reaches only a port its own job listens on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from scheduler.bench.procs import fairgpu_command
from tests.harness.served import Served, serve, simulated_agent, wait_for

BODY = "hello from the job\n"


@dataclass
class People:
    owner: str
    member: str
    rival: str


@pytest.fixture
def people(served: Served) -> People:
    return make_people(served)


def make_people(served: Served) -> People:
    for org in ("acme", "rival"):
        served.ok("org", "create", org)
        served.ok("quota", "set", org, "--gpu-type", "H100", "--guaranteed", "1")

    def token(name: str, org: str) -> str:
        made = served.ok("user", "create", name, "--org", org, "--token", "-o", "json")
        return str(json.loads(made)["token"])

    return People(
        owner=token("ada", "acme"), member=token("bob", "acme"), rival=token("eve", "rival")
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_job(served: Served, token: str, directory: Path, port: int, network: str = "host") -> str:
    """A job serving `directory` over HTTP on 127.0.0.1:`port`, in the node's network (once
    this returns it listens) or in a network of its own (nothing on the node reaches it)."""
    directory.mkdir()
    (directory / "hello.txt").write_text(BODY)
    out = served.ok(
        "submit", "-G", "H100:1", "-t", "10m", "--parsable", "--network", network, "--",
        sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
        "--directory", str(directory),
        token=token,
    )  # fmt: skip
    job = out.strip()
    if network == "host":
        wait_for(lambda: _listening(port), 60)
    return job


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/hello.txt", timeout=10).text == BODY
    except httpx.HTTPError:
        return False


@contextmanager
def forwarding(served: Served, token: str, job: str, remote: int) -> Iterator[ForwardCli]:
    process = subprocess.Popen(
        [*fairgpu_command(), "port-forward", job, f"0:{remote}"],
        env={**os.environ, **served.env(token)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("Forwarding 127.0.0.1:"), line + process.stderr.read()
        yield ForwardCli(process, int(line.split()[1].rsplit(":", 1)[1]))
    finally:
        process.terminate()
        process.wait(timeout=15)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


@dataclass
class ForwardCli:
    process: subprocess.Popen[str]
    port: int


def _metric(served: Served, sample: str) -> float:
    for line in httpx.get(served.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def _raw_request(port: int) -> bytes:
    """An HTTP/1.0 request, then a half-close: the answer must still come back whole."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /hello.txt HTTP/1.0\r\nHost: job\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def test_forwarded_connections_reach_the_jobs_server(
    served: Served, people: People, tmp_path: Path
) -> None:
    """The job runs in a network of its own (the default for a one-node job where the agent
    can): the node cannot reach its server, the forward can."""
    with simulated_agent(served, tmp_path):
        port = _free_port()
        job = _http_job(served, people.owner, tmp_path / "www", port, network="private")
        assert served.ok("describe", job, token=people.owner).count("private") >= 1
        with forwarding(served, people.owner, job, port) as cli:
            wait_for(lambda: _answers(cli.port), 60)  # the job's server is up
            assert not _listening(port)  # and out of the node's reach
            answers: list[str] = []

            def get() -> None:
                reply = httpx.get(f"http://127.0.0.1:{cli.port}/hello.txt", timeout=30)
                answers.append(reply.text)

            threads = [threading.Thread(target=get) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert answers == [BODY] * 4  # several connections at once
            assert _raw_request(cli.port).endswith(BODY.encode())
        # The relay's instruments on the server's /metrics (this process's registry: the
        # counts of earlier tests in it add up, so only growth is asserted).
        wait_for(lambda: _metric(served, 'fairgpu_interactive_sessions_open{kind="port"}') == 0)
        assert _metric(served, 'fairgpu_interactive_relayed_bytes_total{direction="to_job"}') > 0
        assert _metric(served, 'fairgpu_interactive_relayed_bytes_total{direction="from_job"}') > 0
        assert _metric(served, 'fairgpu_interactive_attach_latency_seconds_count{kind="port"}') >= 5
        described = served.ok("describe", job, token=people.owner)
        assert f"started forwarding port {port} of rank 0" in described

        # One event for the whole port-forward run, however many connections it made: it
        # counts them (and their bytes) as they end.
        def forwards() -> list[dict[str, Any]]:
            events = json.loads(served.ok("describe", job, "-o", "json"))["events"]
            return [e for e in events if e["kind"].startswith("job.forward")]

        wait_for(lambda: (forwards()[0]["details"] or {}).get("connections", 0) >= 6, 30)
        [event] = forwards()
        assert event["actor"] == "user:ada"
        assert event["details"]["port"] == port
        assert event["details"]["bytes_from_job"] >= 5 * len(BODY)
        assert event["details"]["bytes_to_job"] > 0


def test_another_orgs_port_on_the_same_node_is_refused(
    served: Served, people: People, tmp_path: Path
) -> None:
    """Both jobs run on node n1 in its network: the rival forwards through its own job to
    acme's port."""
    with simulated_agent(served, tmp_path):
        acme_port = _free_port()
        acme_job = _http_job(served, people.owner, tmp_path / "acme", acme_port)
        rival_job = _http_job(served, people.rival, tmp_path / "rival", _free_port())
        with forwarding(served, people.rival, rival_job, acme_port) as cli:
            with socket.create_connection(("127.0.0.1", cli.port), timeout=30) as s:
                s.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n")
                s.settimeout(30)
                assert s.recv(65536) == b""  # closed: not one byte of acme's server
            assert cli.process.stderr is not None
            err = cli.process.stderr.readline()  # the refusal, once the connection has closed
        assert f"nothing in job {rival_job} listens on port {acme_port}" in err, err
        assert "Traceback" not in err

        # Neither another org's user nor a member who does not own the job may forward.
        for token, code, words in ((people.rival, 5, "not found"), (people.member, 4, "forbid")):
            result = subprocess.run(
                [*fairgpu_command(), "port-forward", acme_job, f"0:{acme_port}"],
                env={**os.environ, **served.env(token)},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == code, result
            assert words in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# Jupyter is not installed here: a stand-in `jupyter-lab` (what the launcher looks for) serves
# /lab and answers 200 only with the token from its environment, as jupyter's own check would,
# and prints its URL with the token as jupyter does.
STAND_IN = """#!{python}
import http.server, os, sys, urllib.parse
port = int([a for a in sys.argv if a.startswith("--port=")][0].split("=")[1])
token = os.environ["JUPYTER_TOKEN"]
print(f"stand-in lab at http://127.0.0.1:{{port}}/lab?token={{token}}", flush=True)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        ok = query.get("token") == [token]
        self.send_response(200 if ok else 403)
        self.end_headers()
        self.wfile.write(b"stand-in lab" if ok else b"bad token")

http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.mark.parametrize("keyed", [True, False], ids=["secret", "no-secrets"])
def test_run_jupyter_prints_a_url_that_reaches_the_notebook(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keyed: bool
) -> None:
    """With secret keys the token is a secret variable, never shown; without, a plain one,
    with a warning."""
    if keyed:
        monkeypatch.setenv("FAIRGPU_SECRET_KEYS", Fernet.generate_key().decode())
    else:
        monkeypatch.delenv("FAIRGPU_SECRET_KEYS", raising=False)
    for served in serve(database_url, tmp_path):
        _jupyter_session(served, make_people(served), tmp_path, keyed)


def _jupyter_session(served: Served, people: People, tmp_path: Path, keyed: bool) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    lab = bin_dir / "jupyter-lab"
    lab.write_text(STAND_IN.format(python=sys.executable))
    lab.chmod(0o755)
    path = f"PATH={bin_dir}:{os.environ['PATH']}"
    with simulated_agent(served, tmp_path):
        process = subprocess.Popen(
            [*fairgpu_command(), "run", "--jupyter", "-G", "H100:1", "-t", "10m", "-e", path],
            env={**os.environ, **served.env(people.owner)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("Jupyter lab of job "), line
            url = line.split(": ", 1)[1].strip()
            job = line.split()[4].rstrip(":")
            token = url.split("token=")[1]
            assert httpx.get(url, timeout=30).text == "stand-in lab"
            wrong = httpx.get(url.replace(token, "guess"), timeout=30)
            assert wrong.status_code == 403
        finally:
            process.terminate()
            _, err = process.communicate(timeout=15)
        assert ("keeps no secrets" in err) is not keyed, err
        logs = served.ok("logs", job, token=people.owner)
        assert "stand-in lab at http://127.0.0.1:" in logs
        assert token not in logs  # replaced by <token> in the job's output
        described = served.ok("describe", job, "-o", "json", token=people.owner)
        assert (token in described) is not keyed
        served.ok("cancel", job, token=people.owner)


def test_run_jupyter_without_jupyter_says_so(
    served: Served, people: People, tmp_path: Path
) -> None:
    with simulated_agent(served, tmp_path):
        result = subprocess.run(
            [*fairgpu_command(), "run", "--jupyter", "-G", "H100:1", "-t", "10m",
             "-e", "PATH=/usr/bin:/bin"],
            env={**os.environ, **served.env(people.owner)},
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert result.returncode != 0
    assert "neither jupyter lab nor jupyter notebook is installed" in result.stderr
    assert "Traceback" not in result.stderr
