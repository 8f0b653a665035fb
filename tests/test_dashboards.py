"""The Grafana dashboard and the alert rules speak only of metrics the daemon exports, and
their PromQL parses (promtool, when installed: CI installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tiktokguard.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "tiktokguard.json"
ALERTS = ROOT / "dashboards" / "alerts.yml"
METRIC = re.compile(r"\b(tiktokguard_[a-z_]+)")


def exported_names() -> set[str]:
    """Every sample name the daemon's registry can expose."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum",
                                                                 "_created"), "gauge": ("",),
                "info": ("_info",)}
    return {family.name + suffix for family in Metrics().registry.collect()
            for suffix in suffixes[family.type]}


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in data["panels"] for t in panel["targets"]]


def test_dashboard_queries_name_only_exported_metrics() -> None:
    exported = exported_names()
    used = {m for expr in dashboard_exprs() for m in METRIC.findall(expr)}
    assert used, "no metrics found in the dashboard"
    assert used <= exported, f"unknown metrics: {sorted(used - exported)}"


def test_dashboard_covers_what_the_soc_needs() -> None:
    data = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in data["panels"])
    for needed in ("by decision", "by rule", "incidents", "upstream latency", "upstream errors",
                   "cache hit ratio", "allowlisted", "blocklist rules"):
        assert needed in titles, needed
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in data["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
    uses = " ".join(dashboard_exprs())
    assert "p95" in json.dumps(data) and "0.99" in uses and "topk(" in uses


def test_alert_rules_are_well_formed() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    exported = exported_names()
    names = set()
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"]
        used = set(METRIC.findall(rule["expr"]))
        assert used <= exported, (rule["alert"], used - exported)
        names.add(rule["alert"])
    assert {"TiktokguardDown", "TiktokguardAllUpstreamsFailing",
            "TiktokguardBlockRateSpike"} <= names


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed "
                    "(apt-get install prometheus; CI does)")
def test_promtool_accepts_alerts_and_dashboard_queries(tmp_path: Path) -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # Grafana's variables replaced by plain values, each query becomes a recording rule.
    records = []
    for n, expr in enumerate(dashboard_exprs()):
        plain = (expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
                 .replace("$instance", ".*"))
        records.append({"record": f"tiktokguard:dashboard_query_{n}", "expr": plain})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed "
                    "(apt-get install prometheus; CI does)")
def test_alerts_fire_for_their_failures_and_not_for_look_alikes() -> None:
    """dashboards/alerts_test.yml: synthetic series for each alert's failure and look-alikes
    (one of two upstreams down, a malformed flood, a stopped instance, a steady block rate)."""
    result = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"],
                            cwd=ALERTS.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
