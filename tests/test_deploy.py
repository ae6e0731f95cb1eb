"""deploy/ stays true: the systemd units parse (``systemd-analyze verify``, where it exists), and
the Kubernetes manifests load as YAML and probe the paths and ports the gateways actually serve,
as read from their config models (docs/deploy.md)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.config import GatewayConfig, load_config
from core.health import HealthServer
from gateways import GATEWAYS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
#: what the ConfigMap's ${…} need (the Secret gives them in a cluster)
ENV = {
    "GATEWAYS_LAYER": "redis://redis:6379/0",
    "POD_NAME": "gateway-mqtt-0",
    "SLACK_BOT_TOKEN": "xoxb-test",
    "SLACK_APP_TOKEN": "xapp-test",
}
#: where the units expect the installation's bin directory
INSTALL_BIN = "/opt/channels-gateways/bin/"


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return documents


def workloads() -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] in ("Deployment", "StatefulSet")]


def gateway_configs(tmp_path: Path) -> dict[str, GatewayConfig]:
    """``/etc/gateways/FILE`` → the validated config of that ConfigMap entry."""
    (config_map,) = [d for d in manifests() if d["kind"] == "ConfigMap"]
    configs = {}
    for key, text in config_map["data"].items():
        module, _, name = GATEWAYS[yaml.safe_load(text)["gateway"]].partition(":")
        model = getattr(importlib.import_module(module), name).config_model
        path = tmp_path / key
        path.write_text(text)
        configs[f"/etc/gateways/{key}"] = load_config(path, model, env=ENV)
    return configs


def test_manifests_load_and_every_workload_has_probes_and_a_budget() -> None:
    documents = manifests()
    budgets = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for d in documents
        if d["kind"] == "PodDisruptionBudget"
    }
    assert len(workloads()) == 7  # six gateways and the workers
    for workload in workloads():
        name = workload["metadata"]["name"]
        spec = workload["spec"]
        assert spec["replicas"] >= 2, name
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        assert labels["app.kubernetes.io/name"] in budgets, f"{name}: no PodDisruptionBudget"
        (container,) = spec["template"]["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name


def test_probes_name_the_health_port_and_grace_of_each_gateways_yaml(tmp_path: Path) -> None:
    configs = gateway_configs(tmp_path)
    seen = set()
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        command = container["command"]
        if "--config" not in command:
            continue  # the workers: runworker --health-port
        path = command[command.index("--config") + 1]
        config = configs[path]
        seen.add(path)
        assert command[0] == f"gateway-{config.gateway.replace('_', '-')}", command
        assert config.health is not None, f"{path}: no health server"
        assert config.health.host == "0.0.0.0", f"{path}: probes cannot reach 127.0.0.1"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] == config.health.port, (path, probe)
        declared = {p["containerPort"] for p in container["ports"]}
        assert config.health.port in declared, path
        assert pod["terminationGracePeriodSeconds"] > config.shutdown_grace, path
    assert seen == set(configs), "a ConfigMap entry no workload uses"


def test_worker_probes_name_its_health_port() -> None:
    (worker,) = [w for w in workloads() if w["metadata"]["name"] == "channels-worker"]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    port = int(command[command.index("--health-port") + 1])
    assert command[command.index("--health-host") + 1] == "0.0.0.0"
    assert container["livenessProbe"]["httpGet"]["port"] == port
    assert container["readinessProbe"]["httpGet"]["port"] == port


def test_the_probed_paths_are_served() -> None:
    server = HealthServer("127.0.0.1", 0, [lambda: []], [lambda: []])
    for path in ("/healthz", "/readyz"):
        assert server._respond(path)[0] == 200, path
    assert server._respond("/nothing")[0] == 404


def test_systemd_units_parse(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    units = sorted(SYSTEMD.glob("*@.*"))
    assert {u.name for u in units} >= {
        *(f"gateway-{g}@.service" for g in ("irc", "email", "mqtt", "slack", "http-ws")),
        "gateway-scheduler@.service",
        "channels-worker@.service",
        "gateways-healthcheck@.service",
        "gateways-healthcheck@.timer",
    }
    # the units name the installation's bin directory; here it is this interpreter's
    here = str(Path(sys.executable).parent) + "/"
    for unit in units:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALL_BIN, here))
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / u.name) for u in units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify warns about unknown keys and bad values on stderr and still exits 0
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
