"""Which tests must not share the machine with every other test: `faults` and `serial`.

`make test` runs three passes. Everything else runs in parallel (`pytest -n N -m 'not serial and
not faults'`, pytest-xdist). Then the `faults` tests, a few at a time (`pytest -n M -m faults`):
each starts its own servers, agents and PostgreSQL, kills only those, and times failovers and
timeouts, so they share nothing with each other but want a machine not crowded by the CPU-bound
parallel pass. Last the `serial` tests, alone (`pytest -m serial`, never with -n): they act
host-wide (kill every process of a uid range, change the host's cgroups) or measure time against
a deadline that even the fault tests' load would make them miss.
"""

from __future__ import annotations

import pytest

# Path prefixes (relative to the repository root) or whole node ids, each with its reason.
SERIAL: dict[str, str] = {
    "tests/agents/test_isolation.py": "kills every process of a uid range; host cgroups",
    "tests/agents/test_node_probes.py": "tasks as other uids in host cgroups; host sysctls read",
    "tests/agents/test_netns.py": "network namespaces, a veth pair and pasta on the host",
    "tests/cli/test_isolated_agent.py": "kills every process of a uid range; host cgroups",
    "tests/cli/test_isolated_pty.py": "kills every process of a uid range; host cgroups",
    "tests/cli/test_port_forward_strict.py": "kills every process of a uid range; host cgroups",
    "tests/api/test_agent_protocol.py::test_long_poll_returns_as_soon_as_work_appears": (
        "a held heartbeat must answer within 2 s of the job's submission"
    ),
    "tests/api/test_job_listing.py::test_a_page_costs_the_same_queries_for_1_or_40_jobs": (
        "counts statements: on a crowded machine the 2 s token cache expires in between"
    ),
}


# Path prefixes of the fault tests: own processes only, timed (see above).
FAULTS: dict[str, str] = {
    "tests/faults/": "kills its own servers, agents and PostgreSQL; times failover and timeouts",
}


def _matches(nodeid: str, keys: dict[str, str]) -> bool:
    return any(nodeid == key or nodeid.startswith(key) for key in keys)


def is_serial(nodeid: str) -> bool:
    return _matches(nodeid, SERIAL)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "serial: must run alone, after the parallel pass (tests/harness/serial.py)"
    )
    config.addinivalue_line(
        "markers", "faults: own processes, timed: a pass of their own (tests/harness/serial.py)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if is_serial(item.nodeid):
            item.add_marker(pytest.mark.serial)
        elif _matches(item.nodeid, FAULTS):
            item.add_marker(pytest.mark.faults)
