"""Simulated GPUs: spec parsing, load that follows tasks, fault injection."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.gpu import SimulatedBackend, normalise_model, parse_simulate_spec
from agents.gpu.simulated import GIB


def test_spec_groups() -> None:
    assert parse_simulate_spec("8xH100") == ["H100"] * 8
    assert parse_simulate_spec("2xH100,1xa100-80gb+L4") == ["H100", "H100", "A100-80GB", "L4"]


@pytest.mark.parametrize("spec", ["", "8xQ9000", "0xH100", "65xH100", "eight H100"])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match=r"GPU"):
        parse_simulate_spec(spec)


def test_devices_are_stable_per_seed_and_distinct_across_nodes() -> None:
    a = SimulatedBackend(parse_simulate_spec("4xA100-80GB"), seed="node-a").devices()
    a_again = SimulatedBackend(parse_simulate_spec("4xA100-80GB"), seed="node-a").devices()
    b = SimulatedBackend(parse_simulate_spec("4xA100-80GB"), seed="node-b").devices()
    assert [g.uuid for g in a] == [g.uuid for g in a_again]
    assert not {g.uuid for g in a} & {g.uuid for g in b}
    assert a[0].memory_bytes == 80 * GIB
    assert a[0].nvlink_peers == [1, 2, 3]


def test_load_follows_tasks_and_energy_grows() -> None:
    backend = SimulatedBackend(parse_simulate_spec("2xH100"))
    first = backend.sample({0: [111]})
    busy, idle = first
    assert busy.utilization_ratio is not None
    assert busy.utilization_ratio > 0.9
    assert busy.memory_used_bytes is not None
    assert busy.memory_total_bytes is not None
    assert busy.memory_used_bytes > 0.5 * busy.memory_total_bytes
    assert [p.pid for p in busy.processes] == [111]
    assert busy.power_w is not None
    assert idle.power_w is not None
    assert busy.power_w > 600 > idle.power_w
    assert idle.utilization_ratio == 0.0
    assert idle.memory_used_bytes == 0
    second = backend.sample({})
    assert second[0].energy_joules is not None
    assert first[0].energy_joules is not None
    assert second[0].energy_joules >= first[0].energy_joules
    assert second[0].utilization_ratio == 0.0


def test_fault_injection() -> None:
    backend = SimulatedBackend(parse_simulate_spec("4xH100"))
    backend.inject_xid(1, 48)
    backend.lose(2)
    backend.inject_xid(3, 13)
    s = backend.sample({})
    assert (s[1].health, s[1].xid_events, s[1].ecc_uncorrected_total) == ("unhealthy", [48], 1)
    assert s[2].health == "lost"
    assert s[2].power_w is None
    assert (s[3].health, s[3].xid_events) == ("healthy", [13])


def test_faults_file_for_demos(tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    backend = SimulatedBackend(parse_simulate_spec("2xH100"), faults_file=faults)
    faults.write_text("xid 0 79\nlost 1\nnonsense\n")
    s = backend.sample({})
    assert s[0].xid_events == [79]
    assert s[1].health == "lost"
    assert not faults.exists()


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA RTX 6000 Ada Generation", "RTX-6000-Ada-Generation"),
    ],
)
def test_model_names_are_normalised(name: str, model: str) -> None:
    assert normalise_model(name) == model
