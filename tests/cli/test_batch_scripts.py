"""Batch scripts: `fairgpu submit train.sh` with `#FAIRGPU` and `#SBATCH` directives, against the
real server (SQLite and PostgreSQL); the script really runs on an agent."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from tests.harness.served import Served, simulated_agent

TRAIN = """#!/bin/bash
# A training run.
#FAIRGPU -G H100:2 -t 4h
#SBATCH --job-name=sweep --nodes=1
#SBATCH -A acme   # the org
#SBATCH -o out-%j.log

echo "args: $0 $1 $2"
#SBATCH --partition=unread-after-the-first-command
"""


def _script(tmp_path: Path, text: str, name: str = "train.sh") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _job(served: Served, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = json.loads(served.ok("describe", job_id, "-o", "json"))
    return job


def test_a_script_carries_its_directives_and_is_stored(served: Served, tmp_path: Path) -> None:
    served.ok("org", "create", "acme")
    result = served.run("submit", "--parsable", _script(tmp_path, TRAIN), "lr=3", "x y")
    assert result.exit_code == 0, result.output
    assert "out-%j.log ignored" in result.stderr
    assert ":6:" in result.stderr
    job = _job(served, result.stdout.strip())
    assert job["command"] == ["train.sh", "lr=3", "x y"]
    assert (job["gpu_type"], job["gpus_per_node"], job["nodes"]) == ("H100", 2, 1)
    assert (job["time_limit_s"], job["name"], job["org_name"]) == (4 * 3600, "sweep", "acme")
    assert job["script"] == TRAIN
    assert served.ok("describe", str(job["id"]), "--script") == TRAIN
    assert "Script: yes" in served.ok("describe", str(job["id"])).replace("  ", "")
    listed = json.loads(served.ok("queue", "-o", "json"))
    assert [j["script"] for j in listed] == [None]  # listings leave the text out


def test_command_line_flags_win_over_directives(served: Served, tmp_path: Path) -> None:
    served.ok("org", "create", "acme")
    script = _script(tmp_path, TRAIN)
    job_id = served.ok("submit", "--parsable", "-t", "30m", "-J", "mine", "-G", "4", script)
    job = _job(served, job_id.strip())
    assert (job["time_limit_s"], job["name"], job["gpus_per_node"]) == (1800, "mine", 4)
    assert job["gpu_type"] is None
    assert job["org_name"] == "acme"  # not given on the command line: the directive's


def test_slurm_gres_dependency_and_hold(served: Served, tmp_path: Path) -> None:
    served.ok("org", "create", "acme")
    first = served.ok("submit", "--parsable", "-A", "acme", "--hold", "--", "true").strip()
    text = f"#!/bin/sh\n#SBATCH --gres=gpu:A100:3 -d afterok:{first} -H\n#SBATCH -t 1:30:00\n"
    text += "#SBATCH --requeue\n"
    job = _job(served, served.ok("submit", "--parsable", "-A", "acme", _script(tmp_path, text)))
    assert (job["gpu_type"], job["gpus_per_node"], job["time_limit_s"]) == ("A100", 3, 5400)
    assert (job["depends_on"], job["held"], job["requeue"]) == ([int(first)], True, True)
    script = _script(tmp_path, text)
    job = _job(served, served.ok("submit", "--parsable", "-A", "acme", "--no-requeue", script))
    assert job["requeue"] is False


def test_bad_scripts_are_one_line_errors(served: Served, tmp_path: Path) -> None:
    cases = {
        "#!/bin/sh\n#SBATCH --partition=gpu\n": "bad.sh:2: unknown directive option --partition",
        "#!/bin/sh\n\n#FAIRGPU -G\n": "bad.sh:3: -G needs a value",
        "#!/bin/sh\n#FAIRGPU --hold=yes\n": "bad.sh:2: --hold takes no value",
        "#!/bin/sh\n#FAIRGPU oops\n": "bad.sh:2: unexpected 'oops'",
        "echo no shebang\n": "must start with a #! line",
        "#!/bin/sh\n" + "#" * (61 * 1024): "at most 61440",
    }
    for text, message in cases.items():
        result = served.run("submit", _script(tmp_path, text, "bad.sh"))
        assert result.exit_code == 2, (text, result.output)
        assert result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.output


def test_the_api_refuses_a_script_without_shebang_or_too_large(served: Served) -> None:
    headers = {"Authorization": f"Bearer {served.admin_token}"}
    served.ok("org", "create", "acme")
    for script, words in (("echo hi\n", "#!"), ("#!/bin/sh\n" + "x" * 70_000, "at most")):
        r = httpx.post(
            f"{served.url}/v1/jobs",
            json={"command": ["a.sh"], "script": script, "org": "acme"},
            headers=headers,
        )
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert words in r.text


def test_double_dash_runs_the_file_as_a_program(served: Served, tmp_path: Path) -> None:
    served.ok("org", "create", "acme")
    script = _script(tmp_path, "#!/bin/sh\n#SBATCH --partition=x\n")  # directives unread
    job = _job(served, served.ok("submit", "--parsable", "-A", "acme", "--", script, "1"))
    assert (job["command"], job["script"]) == ([script, "1"], None)


def test_the_script_runs_on_an_agent(served: Served, tmp_path: Path) -> None:
    served.ok("org", "create", "acme")
    served.ok("quota", "set", "acme", "--gpu-type", "H100", "--guaranteed", "2")
    ada = json.loads(served.ok("user", "create", "ada", "--org", "acme", "--token", "-o", "json"))
    text = '#!/bin/sh\n#FAIRGPU -G H100:1 -t 5m\necho "$0 got $# args: $1|$2"\n'
    with simulated_agent(served, tmp_path):
        job = served.ok(
            "submit", "--parsable", _script(tmp_path, text, "run.sh"), "a b", "c",
            token=ada["token"],
        ).strip()  # fmt: skip
        assert served.ok("logs", job, "-f", token=ada["token"]) == "run.sh got 2 args: a b|c\n"
        deadline = time.monotonic() + 20
        while (state := _job(served, job)["state"]) != "COMPLETED":
            assert state not in ("FAILED", "CANCELLED"), state
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
