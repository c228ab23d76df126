"""Issue 6's "done when": a 2-node × 4-GPU job on two agent processes checks its own environment."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.e2e.conftest import running

# Each rank checks its variables, publishes its MASTER_ADDR:MASTER_PORT in a shared directory
# (both agents run on this machine) and compares it with the other rank's: any miss exits 1.
CHECK_ENV = """
import json, os, pathlib, sys, time
e = os.environ
rank = int(e["FAIRGPU_NODE_RANK"])
problems = []
def want(name, ok):
    if not ok:
        problems.append(f"{name}={e.get(name)!r}")
want("FAIRGPU_NUM_NODES", e.get("FAIRGPU_NUM_NODES") == "2")
want("WORLD_SIZE", e.get("WORLD_SIZE") == "2")
want("NODE_RANK", e.get("NODE_RANK") == str(rank) and rank in (0, 1))
want("CUDA_VISIBLE_DEVICES", len(e.get("CUDA_VISIBLE_DEVICES", "").split(",")) == 4)
want("MASTER_ADDR", bool(e.get("MASTER_ADDR")))
want("MASTER_PORT", e.get("MASTER_PORT", "").isdigit())
master = f"{e.get('MASTER_ADDR')}:{e.get('MASTER_PORT')}"
shared = pathlib.Path(sys.argv[1])
(shared / f"{rank}.tmp").write_text(master)
(shared / f"{rank}.tmp").rename(shared / f"rank{rank}")
other = shared / f"rank{1 - rank}"
deadline = time.monotonic() + 30
while not other.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
want("MASTER (same on both ranks)", other.exists() and other.read_text() == master)
print(json.dumps({"rank": rank, "master": master, "gpus": e.get("CUDA_VISIBLE_DEVICES")}))
print("problems:", problems or "none")
sys.exit(1 if problems else 0)
"""


def test_two_node_gang_runs_on_two_agents(database_url: str, tmp_path: Path) -> None:
    shared = tmp_path / "rendezvous"
    shared.mkdir()
    nodes = (("n1", "lab", "4xH100"), ("n2", "lab", "4xH100"))
    with running(tmp_path / "cluster", database_url=database_url, nodes=nodes) as e2e:
        job_id = e2e.submit(
            [sys.executable, "-c", CHECK_ENV, str(shared)], nodes=2, gpus_per_node=4
        )
        job = e2e.wait_state(job_id, ["COMPLETED"], timeout_s=60)
        assert job["exit_code"] == 0
        logs = [e2e.logs(job_id, rank) for rank in (0, 1)]
    masters = set()
    for rank, text in enumerate(logs):
        lines = text.splitlines()
        assert lines[-1] == "problems: none", text
        assert f'"rank": {rank}' in lines[0], text
        masters.add(lines[0].split('"master": ')[1].split(",")[0])
    assert len(masters) == 1, logs
    assert sorted(p.name for p in shared.iterdir()) == ["rank0", "rank1"]
