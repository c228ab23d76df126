"""`FAIRGPU_REQUIRE_POSTGRES=1`: a skipped PostgreSQL test fails the run, with or without xdist.

Under pytest-xdist the workers' reports reach the controller's `pytest_runtest_logreport` (with
their keywords), so the controller alone counts the skips and sets the exit status; a worker
leaves its own status alone.
"""

from __future__ import annotations

import os

import pytest

_skipped: list[str] = []


def required() -> bool:
    return os.environ.get("FAIRGPU_REQUIRE_POSTGRES") == "1"


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "postgres" in report.keywords:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not required() or not _skipped or _is_worker(session.config):
        return
    print(
        f"\nFAIRGPU_REQUIRE_POSTGRES=1 but {len(_skipped)} PostgreSQL test(s) were skipped, "
        f"e.g. {_skipped[0]}"
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
