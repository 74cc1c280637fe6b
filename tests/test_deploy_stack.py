"""The monitoring stack without docker: a real Prometheus scraping a real ``kanmoe serve``.

The service runs natively (tests/serving.py) and Prometheus (Debian's ``prometheus``) runs on
a free loopback port with the repository's ``docker/prometheus/prometheus.yml`` and
``rules.yml``, rewritten only where docker and a test differ: the kanmoe job scrapes
127.0.0.1:<port> instead of discovering ``kanmoe`` through Docker's DNS, and scrapes and
evaluates every second. After predictions are sent, Prometheus' HTTP API must show

- ``kanmoe_expert_gate_weight_count`` for every expert of the default model, counting every row,
- the traffic-share recording rule summing to 1 per layer and equal to the mean gate weights
  the service returned,
- every PromQL expression of the Grafana dashboard and of the rules evaluating without error
  (the dashboard's with data), and naming only metrics the service exports or the rules record,
- every rule healthy in Prometheus' own evaluation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from kanmoe.paths import CALIFORNIA_HOUSING_CSV, PROJECT_ROOT
from kanmoe.service.metrics import METRIC_DOCS
from tests.serving import DEFAULT_MODEL, DEFAULT_REPOSITORY, LiveServer

pytestmark = pytest.mark.slow

DOCKER = PROJECT_ROOT / "docker"
SPEC = json.loads((DEFAULT_REPOSITORY / DEFAULT_MODEL / "1" / "kanmoe.json").read_text())
FEATURES: list[str] = SPEC["feature_names"]
EXPERTS: list[str] = SPEC["expert_names"]["moe"]
PREDICT = f"/v1/models/{DEFAULT_MODEL}/predict"
# What the dashboard's variables stand for when "All" is selected (their allValue).
DASHBOARD_VARIABLES = {
    "$__rate_interval": "30s",
    "$model": ".*",
    "$version": ".*",
    "$layer": ".*",
    "$expert": ".*",
}
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}
EXPORTED = {name + suffix for name, kind, _, _ in METRIC_DOCS for suffix in _SUFFIXES[kind]} | {
    "up"
}


def tool(name: str) -> str:
    """Path of Debian's ``prometheus``; fail in CI, skip elsewhere, when it is missing."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed: apt-get install -y prometheus"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_config(target: str) -> dict[str, Any]:
    """The repository's Prometheus config with only the target and the intervals changed."""
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "kanmoe"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [target]}]
    return config


class Prometheus:
    """A Prometheus server process and its HTTP API."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def wait_for(self, what: str, check: Any, timeout: float = 30.0) -> Any:
        """Poll ``check()`` until it returns something truthy; fail with ``what`` after."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus: {what} not seen in {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.25)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """Start Prometheus on the repo's config, aimed at one server; stopped after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(server: LiveServer) -> Prometheus:
        binary = tool("prometheus")
        folder = tmp_path / "prometheus"
        folder.mkdir()
        (folder / "prometheus.yml").write_text(yaml.safe_dump(loopback_config(server.address)))
        shutil.copy(DOCKER / "prometheus" / "rules.yml", folder / "rules.yml")
        port = free_port()
        log = folder / "prometheus.log"
        cmd = [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        with open(log, "wb") as sink:
            process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        started.append(process)
        prom = Prometheus(process, f"http://127.0.0.1:{port}", log)

        def ready() -> bool:
            assert process.poll() is None, f"prometheus exited:\n{prom.log_tail()}"
            try:
                return httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        prom.wait_for("readiness", ready)
        return prom

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_loopback_config_changes_only_target_and_intervals() -> None:
    original = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    rewritten = loopback_config("127.0.0.1:1234")
    for config in (original, rewritten):
        config["global"].pop("scrape_interval")
        config["global"].pop("evaluation_interval")
        for job in config["scrape_configs"]:
            job.pop("dns_sd_configs", None)
            job.pop("static_configs", None)
    assert original == rewritten


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query and variable of the dashboard, "All" selected."""
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "kanmoe.json").read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        found.append((f"variable {variable['name']}", match[1]))
    substituted = []
    for where, expr in found:
        for name, value in sorted(DASHBOARD_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(name, value)
        assert "$" not in expr, f"{where}: unknown variable in {expr}"
        substituted.append((where, expr))
    return substituted


def rule_expressions() -> tuple[list[tuple[str, str]], set[str]]:
    """(rule name, PromQL) of every rule, and the names the recording rules define."""
    groups = yaml.safe_load((DOCKER / "prometheus" / "rules.yml").read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    return [(r.get("record") or r["alert"], r["expr"]) for r in rules], {
        r["record"] for r in rules if "record" in r
    }


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: every kanmoe_/kanmoe: name, and any name directly
    followed by a label matcher or a range (functions are followed by '(' instead)."""
    kanmoe = set(re.findall(r"\bkanmoe[_:][A-Za-z0-9_:]+", expr))
    selectors = set(re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\s*[{\[]", expr))
    return kanmoe | selectors


def send_traffic(server: LiveServer) -> tuple[int, np.ndarray]:
    """Predictions with real rows, a few out of range, and one malformed request.

    Returns the rows served and the summed gate weights per expert the service returned.
    """
    frame = pd.read_csv(CALIFORNIA_HOUSING_CSV)
    rows = frame[FEATURES].to_numpy(np.float64)[:240].copy()
    rows[:12, FEATURES.index("MedInc")] = 40.0  # above the training range
    rows[12:15, FEATURES.index("HouseAge")] = -5.0  # below it
    gates = np.zeros(len(EXPERTS))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for start in range(0, len(rows), 16):
            chunk = rows[start : start + 16]
            instances = [dict(zip(FEATURES, map(float, row), strict=True)) for row in chunk]
            r = client.post(PREDICT, json={"instances": instances})
            assert r.status_code == 200, r.text
            gates += np.asarray(r.json()["gate_weights"]["moe"], np.float64).sum(axis=0)
        bad = client.post(PREDICT, json={"instances": [{"MedInc": 1.0}]})  # features missing
        assert bad.status_code in (400, 422), bad.text
    return len(rows), gates


def test_prometheus_scrapes_the_service_and_every_query_works(
    server_factory: Any, prometheus_for: Any
) -> None:
    server = server_factory(DEFAULT_REPOSITORY)
    prom = prometheus_for(server)
    prom.wait_for("the kanmoe target up", lambda: prom.query('up{job="kanmoe"} == 1'))
    # A scrape before any traffic, so each rate window starts from the counters at zero.
    prom.wait_for(
        "the gate-weight series at zero",
        lambda: prom.query(f'kanmoe_expert_gate_weight_count{{model="{DEFAULT_MODEL}"}} == 0'),
    )
    rows, gates = send_traffic(server)

    total = f'sum(kanmoe_rows_total{{model="{DEFAULT_MODEL}"}})'
    prom.wait_for(
        f"{rows} rows", lambda: [s for s in prom.query(total) if float(s["value"][1]) == rows]
    )

    counts = prom.query(f'kanmoe_expert_gate_weight_count{{model="{DEFAULT_MODEL}"}}')
    by_expert = {s["metric"]["expert"]: float(s["value"][1]) for s in counts}
    assert by_expert == dict.fromkeys(EXPERTS, rows)
    assert {s["metric"]["job"] for s in counts} == {"kanmoe"}

    # The recording rule, once evaluated after the last scrape: shares equal the mean gate
    # weights the service answered with (same scrapes in numerator and denominator).
    want = gates / gates.sum()
    rule = f'kanmoe:expert_traffic_share:ratio_rate5m{{model="{DEFAULT_MODEL}"}}'

    def shares_match() -> dict[str, float] | None:
        got = {s["metric"]["expert"]: float(s["value"][1]) for s in prom.query(rule)}
        close = set(got) == set(EXPERTS) and all(
            abs(got[e] - w) < 1e-4 for e, w in zip(EXPERTS, want, strict=True)
        )
        return got if close else None

    shares = prom.wait_for(f"traffic shares {want.round(4).tolist()}", shares_match)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    per_layer = prom.query(f"sum by (model, version, layer) ({rule})")
    assert [float(s["value"][1]) for s in per_layer] == pytest.approx([1.0], abs=1e-9)

    # Out-of-range rows were counted per feature and side, and the ratio rule sees them.
    # (Waited for: an evaluation from before the last scrape sees only part of the traffic.)
    ratio = 'kanmoe:input_out_of_range:ratio_rate5m{feature="MedInc", side="above"}'
    prom.wait_for(
        f"the out-of-range ratio {12 / rows}",
        lambda: [s for s in prom.query(ratio) if abs(float(s["value"][1]) - 12 / rows) < 1e-9],
    )
    below = 'kanmoe:input_out_of_range:ratio_rate5m{feature="HouseAge", side="below"}'
    assert float(prom.query(below)[0]["value"][1]) == pytest.approx(3 / rows, rel=1e-9)

    rules, recorded = rule_expressions()
    scraped = set(httpx.get(f"{prom.url}/api/v1/label/__name__/values", timeout=10).json()["data"])
    for where, expr in [*dashboard_expressions(), *rules]:
        for name in metric_names(expr):
            if name.startswith("kanmoe:"):
                assert name in recorded, f"{where}: {name} is not a recording rule"
            else:
                assert name in EXPORTED, f"{where}: {name} is not a metric kanmoe exports"
                assert name in scraped or name == "up", f"{where}: {name} never scraped"
        result = prom.query(expr)  # fails on any PromQL error
        if where.startswith(("panel", "variable")):
            assert result, f"{where}: {expr} returned no data"

    # Every recording rule produced data, and Prometheus evaluated every rule without error.
    for name in sorted(recorded):
        prom.wait_for(f"data for {name}", lambda name=name: prom.query(name))
    groups = httpx.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    health = {r["name"]: (r["health"], r.get("lastError", "")) for g in groups for r in g["rules"]}
    assert len(health) == len(rules)
    assert all(h == ("ok", "") for h in health.values()), health
