"""The core decides exactly what it decided before its speed work (recorded at commit 9648a50)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.core.golden import record

RECORDED = Path(__file__).with_name("golden_decisions.json")


def test_decisions_match_those_recorded_before_the_speed_work() -> None:
    expected = json.loads(RECORDED.read_text())
    got = record()
    assert sorted(got) == sorted(expected)
    differ = [name for name in expected if got[name] != expected[name]]
    assert differ == []


def test_the_digest_sees_a_changed_decision() -> None:
    # Guard against a digest that cannot fail: a different snapshot gives different digests.
    expected = json.loads(RECORDED.read_text())
    assert len({v[0] for v in expected.values()}) == len(expected)
