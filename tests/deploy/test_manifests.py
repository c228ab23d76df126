"""Deployment files that cannot run here (no Docker, no cluster), checked against their schemas."""

from __future__ import annotations

import configparser
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.deploy.promql import DEPLOY, REPO

KUBERNETES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.30"


def compose_schema() -> dict[str, Any]:
    """The compose-spec JSON schema (compose-spec/compose-spec) as check-jsonschema vendors it."""
    text = (
        resources.files("check_jsonschema.builtin_schemas.vendor")
        .joinpath("compose-spec.json")
        .read_text()
    )
    schema: dict[str, Any] = json.loads(text)
    return schema


def test_compose_file_matches_the_compose_spec() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.validate(compose, compose_schema())
    services = compose["services"]
    assert {"postgres", "server", "prometheus", "grafana"} <= services.keys()
    agents = [name for name in services if name.startswith("agent-")]
    assert len(agents) >= 2
    for name in agents:
        assert "--simulate" in " ".join(services[name]["command"]), name
        # An init is process 1, not the agent that the shell execs (cli/agent.py).
        assert services[name]["init"] is True, name
    assert services["server"]["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / services["server"]["build"]["context"] / "Dockerfile").is_file()
    assert "postgresql://" in services["server"]["environment"]["FAIRGPU_DATABASE_URL"]
    # /metrics answers only its own machine without a token: the server reads the token
    # Prometheus sends (prometheus.yml's credentials_file) from the volume they share.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [scrape] = [j for j in prometheus["scrape_configs"] if j["job_name"] == "fairgpu-server"]
    token_file = Path(scrape["authorization"]["credentials_file"])
    mount = f"metrics-token:{token_file.parent}:ro"
    assert mount in services["server"]["volumes"]
    assert mount in services["prometheus"]["volumes"]
    assert f"FAIRGPU_METRICS_TOKEN=$$(cat {token_file})" in services["server"]["command"][0]
    assert services["server"]["depends_on"]["metrics-token"] == {
        "condition": "service_completed_successfully"
    }
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"compose mounts missing {source}"


def test_compose_schema_rejects_a_broken_file() -> None:
    broken = {"services": {"server": {"image": "x", "comand": ["server"]}}}  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, compose_schema())


def test_file_sd_targets_are_the_compose_agents() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    agents = {name for name in compose["services"] if name.startswith("agent-")}
    listed = yaml.safe_load((DEPLOY / "prometheus" / "file_sd" / "agents.yml").read_text())
    targets = {t.split(":")[0] for entry in listed for t in entry["targets"]}
    assert targets == agents


def kubernetes_resources() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in KUBERNETES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    checked = 0
    for _name, doc in kubernetes_resources():
        if doc["apiVersion"].startswith(("monitoring.coreos.com/", "kustomize.config.k8s.io/")):
            continue  # CRDs: checked by hand below
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 6


def test_kubernetes_validation_can_fail() -> None:
    deployment = next(d for _, d in kubernetes_resources() if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in kubernetes_resources() if doc["kind"] == kind]


def test_server_deployment_reads_postgresql_from_a_secret() -> None:
    (deployment,) = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    secret_ref = env["FAIRGPU_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    secrets = {s["metadata"]["name"]: s for s in by_kind("Secret")}
    assert secret_ref["key"] in secrets[secret_ref["name"]]["stringData"]
    assert secrets[secret_ref["name"]]["stringData"]["url"].startswith("postgresql://")
    (service,) = by_kind("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_agent_daemonset_runs_on_gpu_nodes_with_the_nvidia_runtime() -> None:
    (daemonset,) = by_kind("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (container,) = pod["containers"]
    assert container["args"][0] == "agent"
    assert any(p["name"] == "metrics" for p in container["ports"])
    assert "--isolation=strict" in container["args"]
    assert container["securityContext"]["privileged"] is True


def test_the_agents_exec_helper_is_where_the_hosts_runtime_finds_it() -> None:
    """docker and podman bind-mount the helper into each container from the host's path: the
    agent's --exec-helper lies on a host directory mounted at the same path in its pod, and the
    init container copies the image's helper there."""
    (daemonset,) = by_kind("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (helper,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--exec-helper=")]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    directory = str(Path(helper).parent)
    assert host_paths[mounts[directory]] == directory
    (init,) = pod["initContainers"]
    assert init["image"] == container["image"]
    assert f'"{helper}"' in init["command"][-1]
    assert any(m["mountPath"] == directory for m in init["volumeMounts"])


def test_monitors_select_the_server_service_and_agent_pods() -> None:
    (service_monitor,) = by_kind("ServiceMonitor")
    (pod_monitor,) = by_kind("PodMonitor")
    (service,) = by_kind("Service")
    (daemonset,) = by_kind("DaemonSet")
    selector = service_monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in service_monitor["spec"]["endpoints"]} <= ports
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= {
        p["name"] for p in container["ports"]
    }


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in KUBERNETES} - {"kustomization.yaml"}


def test_dockerfile_copies_paths_that_exist_and_runs_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+?) (\S+)$", text, re.MULTILINE)
    assert copies
    for sources, _dest in copies:
        for source in sources.split():
            assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert all(s.startswith("python:3.11-slim") for s in stages)
    # Process 1 of the container is an init that reaps orphans, not the agent (cli/agent.py).
    assert re.search(r'^ENTRYPOINT \["tini", "--", "fairgpu"\]$', text, re.MULTILINE)
    assert "tini" in re.findall(r"install -y --no-install-recommends (.*) \\$", text, re.M)[-1]
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users
    assert not users[-1].startswith(("root", "0"))
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r"packages = \[(.*?)\]", pyproject)
    assert packages is not None
    for package in re.findall(r'"(\w+)"', packages.group(1)):
        assert f"COPY {package} ./{package}" in text, f"Dockerfile misses package {package}"


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


@pytest.mark.parametrize("name", ["fairgpu-server.service", "fairgpu-agent.service"])
def test_systemd_units_are_hardened(name: str) -> None:
    service = unit(DEPLOY / "systemd" / name)["Service"]
    # The agent is root to confine tasks (docs/ISOLATION.md); the server never needs it.
    assert service["User"] == ("root" if name == "fairgpu-agent.service" else "fairgpu")
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["Restart"] in {"on-failure", "always"}
    assert service["EnvironmentFile"].startswith("/etc/fairgpu/")
    command = service["ExecStart"].split()
    assert command[0].endswith("/fairgpu")
    assert command[1] in {"server", "agent"}
    example = DEPLOY / "systemd" / f"{command[1]}.env.example"
    assert example.is_file()
    assert all(
        line.startswith(("#", "FAIRGPU_")) for line in example.read_text().splitlines() if line
    )
