"""The SOC's view, end to end: a real Prometheus (Debian's binary, started here on loopback with
a temporary TSDB, scraping every second and loading dashboards/alerts.yml) scrapes a daemon that
the test drives over real sockets. The dashboard's own queries are asked of it."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests import reaper
from tests.conftest import MANAGED, Running, running_daemon
from tests.fakes import FakeUpstream, free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "tiktokguard.json"
pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="needs Debian's prometheus (CI installs it)")


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"

    async def query(self, http: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        async with http.get(self.base + "/query", params={"query": expr}) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    async def wait_for(self, http: aiohttp.ClientSession, expr: str, seconds: float = 30
                       ) -> list[dict[str, Any]]:
        """Poll (every 0.5 s, bounded) until the query has a result: Prometheus scrapes and
        evaluates on its own schedule, which the test cannot signal."""
        async with asyncio.timeout(seconds):
            while True:
                try:
                    result = await self.query(http, expr)
                except aiohttp.ClientConnectionError:
                    result = []  # still starting
                if result:
                    return result
                await asyncio.sleep(0.5)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> Prometheus:
        port = free_port()
        rules = tmp_path / "alerts.yml"
        shutil.copy(ROOT / "dashboards" / "alerts.yml", rules)
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "tiktokguard",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))
        log = (tmp_path / "prometheus.log").open("wb")
        processes.append(reaper.popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=log))
        return Prometheus(port)

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
async def tg_http(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[Running]:
    async with running_daemon(tmp_path, [upstream.address], http=True) as running:
        yield running


def panel_expr(title: str) -> str:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    (panel,) = [p for p in panels if p.get("title") == title]
    return str(panel["targets"][0]["expr"]).replace("$__range", "5m").replace(
        "$__rate_interval", "5m").replace("$instance", ".*")


async def test_a_rules_first_block_shows_in_the_panel_and_a_refusing_upstream_alerts(
        tg_http: Running, upstream: FakeUpstream, prometheus_for: Any) -> None:
    prometheus = prometheus_for(tg_http.http_port)
    async with aiohttp.ClientSession() as http:
        await prometheus.wait_for(http, 'up{job="tiktokguard"} == 1')
        # Two scrapes of the idle daemon: every rule's series exists at 0 beforehand.
        await prometheus.wait_for(
            http, 'count_over_time(tiktokguard_dns_blocked_total{rule="coze.com"}[1m]) >= 2')
        reply = await tg_http.ask("www.coze.com", source=MANAGED)  # the rule's very first block
        assert reply.rcode() == 3
        panel = panel_expr("Blocked queries by rule (top 10, selected range)")
        shown = await prometheus.wait_for(http, f"({panel}) > 0", seconds=10)
        assert {r["metric"]["rule"] for r in shown} == {"coze.com"}
        assert float(shown[0]["value"][1]) >= 1  # (increase() extrapolates: 1 or a bit more)

        # An upstream that refuses everything: the all-failing alert goes pending.
        upstream.servfail_all = True
        for i in range(8):
            await tg_http.ask(f"r{i}.a.test", source="127.0.1.5")
        alerts = await prometheus.wait_for(
            http, 'ALERTS{alertname="TiktokguardAllUpstreamsFailing"}', seconds=20)
        assert alerts[0]["metric"]["alertstate"] in ("pending", "firing")
        assert alerts[0]["metric"]["job"] == "tiktokguard"
        assert alerts[0]["metric"]["instance"] == f"127.0.0.1:{tg_http.http_port}"
        up = await prometheus.query(http, panel_expr("Upstreams up"))
        assert [float(r["value"][1]) for r in up] == [0.0]

        # Every panel's queries run against the real Prometheus; what each shows is printed
        # (pytest -s) for the people reading the dashboard.
        for panel in json.loads(DASHBOARD.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = str(target["expr"]).replace("$__range", "5m").replace(
                    "$__rate_interval", "1m").replace("$instance", ".*")
                result = await prometheus.query(http, expr)
                shown = ", ".join(
                    f"{','.join(v for _k, v in sorted(r['metric'].items()))}="
                    f"{float(r['value'][1]):.3g}" for r in result[:4]) or "(no data)"
                print(f"panel {panel['title']!r}: {shown}")
