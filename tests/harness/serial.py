"""Which tests must not share the machine with other tests, marked `serial`.

`make test` runs everything else in parallel (`pytest -n N -m 'not serial'`, pytest-xdist), then
these alone (`pytest -m serial`). A test belongs here when it acts host-wide or measures time
against a deadline that a loaded machine would miss for reasons of its own: it kills processes by
uid range, changes the host's cgroups, or times a failover or a restart.
"""

from __future__ import annotations

import pytest

# Path prefixes (relative to the repository root) or whole node ids, each with its reason.
SERIAL: dict[str, str] = {
    "tests/agents/test_isolation.py": "kills every process of a uid range; host cgroups",
    "tests/agents/test_netns.py": "network namespaces, a veth pair and pasta on the host",
    "tests/cli/test_isolated_agent.py": "kills every process of a uid range; host cgroups",
    "tests/cli/test_isolated_pty.py": "kills every process of a uid range; host cgroups",
    "tests/cli/test_port_forward_strict.py": "kills every process of a uid range; host cgroups",
    "tests/faults/": "kills servers, agents and a private PostgreSQL; times failover and timeouts",
    "tests/api/test_agent_protocol.py::test_long_poll_returns_as_soon_as_work_appears": (
        "a held heartbeat must answer within 2 s of the job's submission"
    ),
    "tests/api/test_job_listing.py::test_a_page_costs_the_same_queries_for_1_or_40_jobs": (
        "counts statements: on a crowded machine the 2 s token cache expires in between"
    ),
}


def is_serial(nodeid: str) -> bool:
    return any(nodeid == key or nodeid.startswith(key) for key in SERIAL)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "serial: must run alone, after the parallel pass (tests/harness/serial.py)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if is_serial(item.nodeid):
            item.add_marker(pytest.mark.serial)
