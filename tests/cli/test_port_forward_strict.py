"""`fairgpu port-forward` on a strict node (root): the task's processes are those of its cgroup,
and the jobs of two orgs, each as its own uid, still share the node's network. Built on the
strict pool of tests/cli/test_isolated_agent.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.cli.test_isolated_agent import PY, Pool
from tests.cli.test_port_forward import _free_port, _listening, forwarding
from tests.harness.served import Served, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="strict isolation needs root")

# Answers every connection with ARGV[2] and closes it.
_GREETER = """
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = server.accept()
    conn.sendall(sys.argv[2].encode())
    conn.close()
"""


def _read_all(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_a_strict_nodes_forward_reaches_only_the_jobs_own_port(
    served: Served, tmp_path: Path
) -> None:
    pool = Pool(served, tmp_path)
    try:
        acme_port, rival_port = _free_port(), _free_port()
        host = ("--network", "host")  # both in the node's network: the ownership check
        acme = pool.submit("acme", *host, "--", PY, "-c", _GREETER, str(acme_port), "acme-says-hi")
        rival = pool.submit("rival", *host, "--", PY, "-c", _GREETER, str(rival_port), "rival")
        for org, job in (("acme", acme), ("rival", rival)):
            pool.wait_state(org, job, {"RUNNING"})
        wait_for(lambda: _listening(acme_port) and _listening(rival_port), 30)

        with forwarding(served, pool.tokens["acme"], acme, acme_port) as cli:
            assert _read_all(cli.port) == b"acme-says-hi"
        with forwarding(served, pool.tokens["rival"], rival, acme_port) as cli:
            assert _read_all(cli.port) == b""
            assert cli.process.stderr is not None
            refusal = cli.process.stderr.readline()
        assert f"nothing in job {rival} listens on port {acme_port}" in refusal, refusal
    finally:
        pool.close()
