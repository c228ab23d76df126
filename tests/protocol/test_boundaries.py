"""The agent side of the protocol stands alone: agents import `protocol`, never the server."""

from __future__ import annotations

import subprocess
import sys


def test_agent_modules_import_nothing_from_the_server() -> None:
    code = (
        "import sys, pkgutil, importlib, agents\n"
        "for m in pkgutil.walk_packages(agents.__path__, 'agents.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(' '.join(sorted(n for n in sys.modules if n.split('.')[0] in "
        "('api', 'scheduler', 'fastapi', 'sqlalchemy'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def test_gpu_health_has_one_definition() -> None:
    from protocol import agent, states

    assert agent.GpuSample.model_fields["health"].annotation is states.GpuHealth
