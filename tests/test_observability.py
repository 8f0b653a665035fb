"""What the SOC and the admins see: /metrics, incidents (log, store, API, webhook), readiness."""

from __future__ import annotations

import asyncio
import json
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tests.conftest import DEVICE_IP, MANAGED, OUTSIDER, UNMANAGED, Running, running_daemon
from tests.fakes import FakeUpstream, free_port
from tests.test_api import PHONE, TOKENS, Api
from tiktokguard.devices.store import SqliteStore


async def scrape(tg: Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{tg.http_port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def get(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_each_decision_exactly(tmp_path: Path, upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True) as tg:
        before = await scrape(tg)
        await tg.add_device(addresses=[DEVICE_IP])
        await tg.ask("www.tiktok.com")  # blocked
        await tg.ask("v16.tiktokcdn.com", tcp=True)  # blocked over TCP
        await tg.ask("a.test")  # allowed (miss)
        await tg.ask("a.test")  # allowed (hit)
        await tg.ask("www.tiktok.com", source=DEVICE_IP)  # allowlisted
        await tg.ask("www.douyin.com", source=UNMANAGED)  # unmanaged
        await tg.ask("a.test", source=OUTSIDER)  # refused
        await tg.ask("timeout.test", wait=5)  # error: every upstream failed
        bad = struct.pack("!HHHHHH", 9, 0x0100, 0, 0, 0, 0)  # QDCOUNT 0: FORMERR
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=("127.0.0.1", tg.port))
        transport.sendto(bad)
        transport.close()
        await tg.ask("b.a.test")  # after the FORMERR, so it has been counted
        after = await scrape(tg)

    def moved(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    q = "tiktokguard_dns_queries_total"
    assert moved(q, transport="udp", decision="blocked") == 1
    assert moved(q, transport="tcp", decision="blocked") == 1
    assert moved(q, transport="udp", decision="allowed") == 3
    assert moved(q, transport="udp", decision="allowlisted") == 1
    assert moved(q, transport="udp", decision="unmanaged") == 1
    assert moved(q, transport="udp", decision="refused") == 1
    # Only the SERVFAIL we gave (timeout.test): the malformed query has its own counter.
    assert moved(q, transport="udp", decision="error") == 1
    assert moved("tiktokguard_dns_blocked_total", rule="tiktok.com") == 1
    assert moved("tiktokguard_dns_blocked_total", rule="tiktokcdn.com") == 1
    assert moved("tiktokguard_malformed_queries_total", reason="formerr") == 1
    assert moved("tiktokguard_cache_hits_total") == 1
    assert moved("tiktokguard_cache_misses_total") == 5
    assert moved("tiktokguard_incidents_total") == 2
    assert moved("tiktokguard_upstream_errors_total", upstream=upstream.address,
                 kind="timeout") == 1
    assert get(after, "tiktokguard_allowlisted_devices") == 1
    assert get(after, "tiktokguard_blocklist_rules") > 100
    assert moved("tiktokguard_dns_request_duration_seconds_count") == 10
    assert moved("tiktokguard_upstream_request_duration_seconds_count",
                 upstream=upstream.address) == 4
    # No label anywhere carries a client address or a query name.
    clients = (MANAGED, DEVICE_IP, UNMANAGED, OUTSIDER)
    for _name, labels in after:
        for _key, value in labels:
            assert not any(value.startswith(c) for c in clients), labels
            assert "a.test" not in value and "www." not in value, labels


async def test_fifty_blocked_queries_make_one_incident(tmp_path: Path,
                                                       upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True) as tg, \
            aiohttp.ClientSession() as session:
        api = Api(tg, session)
        with capture_logs() as logs:
            for i in range(50):
                await tg.ask(f"x{i}.tiktok.com", tcp=i % 2 == 0)
            await tg.ask("www.douyin.com")  # another rule
            await tg.ask("www.tiktok.com", source="127.0.0.6")  # another client
            status, body = await api.call("GET", "/api/v1/incidents")
        assert status == 200
        incidents = {(i["client_ip"], i["rule"]): i for i in body["incidents"]}
        assert set(incidents) == {(MANAGED, "tiktok.com"), (MANAGED, "douyin.com"),
                                  ("127.0.0.6", "tiktok.com")}
        first = incidents[MANAGED, "tiktok.com"]
        assert first["count"] == 50 and first["name"] == "x0.tiktok.com"
        assert first["qtype"] == "A" and first["first_seen"] <= first["last_seen"]
        events = [e for e in logs if e["event"] == "policy_violation"]
        assert len(events) == 3
        assert {e["incident_id"] for e in events} == {i["incident_id"] for i in incidents.values()}
        keys = {"incident_id", "timestamp", "client_ip", "client_mac", "name", "rule", "qtype",
                "count", "first_seen", "last_seen"}
        assert keys - {"timestamp"} <= set(events[0])
        # Filters and paging.
        status, body = await api.call("GET", f"/api/v1/incidents?client={MANAGED}&rule=douyin.com")
        assert [i["rule"] for i in body["incidents"]] == ["douyin.com"]
        status, body = await api.call("GET", "/api/v1/incidents?limit=1&offset=1")
        assert len(body["incidents"]) == 1


async def test_incident_window_and_write_back(tmp_path: Path, upstream: FakeUpstream) -> None:
    now = [1_700_000_000.0]
    extra = TOKENS + "\n[incidents]\nwindow_seconds = 60"
    async with running_daemon(tmp_path, [upstream.address], extra=extra, http=True,
                              clock=lambda: now[0]) as tg, aiohttp.ClientSession() as session:
        api = Api(tg, session)
        await tg.ask("www.tiktok.com")
        await tg.daemon.incidents.flush()
        for _ in range(4):
            now[0] += 10
            await tg.ask("www.tiktok.com")
        now[0] += 30  # 70 s after the first: the window has closed
        await tg.ask("www.tiktok.com")
        status, body = await api.call("GET", "/api/v1/incidents")
        assert status == 200
        counts = sorted(i["count"] for i in body["incidents"])
        assert counts == [1, 5]  # the first incident's final count was written back


async def test_incident_names_device_and_mac_when_known(tmp_path: Path,
                                                        upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True) as tg, \
            aiohttp.ClientSession() as session:
        api = Api(tg, session)
        status, device = await api.call("POST", "/api/v1/devices", json=PHONE)
        assert status == 201
        status, device = await api.call("PATCH", f"/api/v1/devices/{device['id']}",
                                        json={"expires_at": "2020-01-01T00:00:00Z"})
        assert status == 200 and device["expired"]
        await tg.ask("www.tiktok.com", source=DEVICE_IP)  # expired device: blocked
        status, body = await api.call("GET", "/api/v1/incidents")
        (incident,) = body["incidents"]
        assert incident["device_name"] == PHONE["name"] and incident["client_ip"] == DEVICE_IP


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[str, list[dict[str, Any]], asyncio.Event]]:
    received: list[dict[str, Any]] = []
    attempts: list[int] = []
    two = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        attempts.append(1)
        if len(attempts) == 1:
            return web.Response(status=503)  # the first delivery fails: it must be retried
        received.append(await request.json())
        if len(received) >= 2:
            two.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/hook", received, two
    await runner.cleanup()


async def test_webhook_gets_each_incident_once(tmp_path: Path, upstream: FakeUpstream,
                                               webhook: tuple[str, list[dict[str, Any]],
                                                              asyncio.Event]) -> None:
    url, received, two = webhook
    extra = TOKENS + f'\n[incidents]\nwebhook_url = "{url}"'
    async with running_daemon(tmp_path, [upstream.address], extra=extra, http=True) as tg:
        for _ in range(10):
            await tg.ask("www.tiktok.com")
        await tg.ask("www.capcut.com")
        await tg.daemon.incidents.flush()
        async with asyncio.timeout(10):
            await two.wait()
        assert sorted(e["rule"] for e in received) == ["capcut.com", "tiktok.com"]
        assert received[0]["incident_id"] != received[1]["incident_id"]
        # Same shape as the log line (the first POST got a 503 and was retried).
        assert {e["event"] for e in received} == {"policy_violation"}
        assert {"incident_id", "timestamp", "client_ip", "client_mac", "name", "rule", "qtype",
                "count", "first_seen", "last_seen"} <= set(received[0])


async def test_dead_webhook_does_not_slow_dns(tmp_path: Path, upstream: FakeUpstream) -> None:
    accepted = asyncio.Event()
    release = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await release.wait()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(hang, "127.0.0.1", port)
    extra = TOKENS + f'\n[incidents]\nwebhook_url = "http://127.0.0.1:{port}/hook"'
    try:
        async with running_daemon(tmp_path, [upstream.address], extra=extra, http=True) as tg:
            await tg.ask("www.tiktok.com")
            await tg.daemon.incidents.flush()
            async with asyncio.timeout(10):
                await accepted.wait()  # the webhook POST is now stuck in flight
            for i in range(30):
                reply = await tg.ask(f"n{i}.douyin.com", wait=1)
                assert reply.rcode() == 3
            assert not release.is_set()  # all answered while the webhook still hangs
            release.set()
    finally:
        release.set()
        server.close()


async def test_incident_retention(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "s.sqlite3")
    try:
        rows = [{"incident_id": f"i{n}", "client_ip": "10.0.0.1", "client_mac": None,
                 "device_name": None, "name": "tiktok.com", "rule": "tiktok.com", "qtype": "A",
                 "count": 1, "first_seen": f"2026-01-{n + 1:02d}T00:00:00.000Z",
                 "last_seen": f"2026-01-{n + 1:02d}T00:00:00.000Z"} for n in range(10)]
        await store.save_incidents(rows)
        assert await store.prune_incidents("2026-01-04T00:00:00.000Z", keep=1000) == 3
        assert await store.prune_incidents("2000-01-01T00:00:00.000Z", keep=5) == 2
        left = await store.incidents(None, None, None, 100, 0)
        assert [r["incident_id"] for r in left] == ["i9", "i8", "i7", "i6", "i5"]
    finally:
        await store.close()


async def test_readyz_fails_when_all_upstreams_fail(tmp_path: Path) -> None:
    dead = await FakeUpstream(silent=True).start()
    try:
        async with running_daemon(tmp_path, [dead.address], http=True) as tg, \
                aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{tg.http_port}/readyz"
            async with session.get(url) as response:
                assert response.status == 200  # nothing has failed yet
                body = await response.json()
                assert set(body["components"]) == {"listeners", "lists", "store", "upstreams",
                                                   "workers"}
                assert all(c["ready"] for c in body["components"].values())
            await tg.ask("a.test", wait=3)
            async with session.get(url) as response:
                # Started a moment ago: one failure is not "no answer for 30 s".
                assert response.status == 200
            tg.daemon.pool.created -= 60  # as if it had been up for a minute, never answered
            async with session.get(url) as response:
                body = await response.json()
                assert response.status == 503
                assert body["problems"] == ["upstreams: no upstream has answered for 30 s "
                                            "while queries were failing"]
                assert body["components"]["upstreams"]["ready"] is False
    finally:
        dead.close()


def test_event_json_shape() -> None:
    from tiktokguard.incidents import Incident

    incident = Incident("abc", "10.0.0.1", None, "www.tiktok.com", "tiktok.com", "AAAA", 3,
                        1_700_000_000.0, 1_700_000_001.5)
    event = incident.to_json()
    assert event["first_seen"] == "2023-11-14T22:13:20.000Z"
    assert event["last_seen"] == "2023-11-14T22:13:21.500Z"
    json.dumps(event)



async def test_a_restart_does_not_open_a_second_incident_in_the_window(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address]) as first:
        await first.ask("www.tiktok.com")
        await first.ask("m.tiktok.com")
        assert first.daemon.incidents is not None
        await first.daemon.incidents.flush()
        (incident,) = first.daemon.incidents.open.values()
    async with running_daemon(tmp_path, [upstream.address]) as second:
        await second.ask("www.tiktok.com")
        await second.daemon.incidents.flush()
        assert second.metrics.sample("tiktokguard_incidents_total") == 0  # none new
        (same,) = second.daemon.incidents.open.values()
        assert same.incident_id == incident.incident_id and same.count == 3
        rows = await second.daemon.store.incidents(None, None, None, 10, 0)
        assert [(r["incident_id"], r["count"]) for r in rows] == [(incident.incident_id, 3)]


async def test_every_labelled_counter_is_exported_at_zero_from_the_start(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address]) as tg:
        value = tg.metrics.registry.get_sample_value
        # A rule's first block must show in increase(): its series exists before it.
        for rule in ("tiktok.com", "coze.com", "larksuite.com", "use-application-dns.net"):
            assert value("tiktokguard_dns_blocked_total", {"rule": rule}) == 0
        for kind in ("timeout", "unreachable", "servfail", "refused", "malformed"):
            assert value("tiktokguard_upstream_errors_total",
                         {"upstream": upstream.address, "kind": kind}) == 0
        for reason in ("queue_full", "unreachable", "http_4xx", "http_5xx"):
            assert value("tiktokguard_incident_webhook_dropped_total", {"reason": reason}) == 0
        assert value("tiktokguard_upstream_request_duration_seconds_count",
                     {"upstream": upstream.address}) == 0
        assert value("tiktokguard_upstream_up", {"upstream": upstream.address}) == 1
        # A reload adds the new rules at 0 and keeps the old ones.
        lists = tmp_path / "new.txt"
        lists.write_text("newrule.example\n")
        from dataclasses import replace

        from tiktokguard.policy.domains import ListSource

        core = tg.daemon.core
        core.config = replace(core.config, policy=replace(
            core.config.policy, blocklists=(ListSource(str(lists), lists),)))
        await core.reload_lists()
        assert value("tiktokguard_dns_blocked_total", {"rule": "newrule.example"}) == 0
        assert value("tiktokguard_dns_blocked_total", {"rule": "tiktok.com"}) == 0


async def test_upstream_up_tells_a_refusing_upstream_from_a_working_one(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address]) as tg:
        value = tg.metrics.registry.get_sample_value
        labels = {"upstream": upstream.address}
        await tg.ask("a.test", source=UNMANAGED)
        assert value("tiktokguard_upstream_up", labels) == 1
        latency = value("tiktokguard_upstream_request_duration_seconds_count", labels)
        upstream.servfail_all = True
        for i in range(8):  # every answer SERVFAIL: no use to anyone
            await tg.ask(f"s{i}.a.test", source=UNMANAGED)
        assert value("tiktokguard_upstream_up", labels) == 0
        # A refusing upstream is fast; its answers are not latency samples of a healthy one.
        assert value("tiktokguard_upstream_request_duration_seconds_count", labels) == latency
        upstream.servfail_all = False
        await tg.ask("ok.a.test", source=UNMANAGED)
        assert value("tiktokguard_upstream_up", labels) == 1


async def test_incidents_since_includes_the_same_second(tmp_path: Path,
                                                        upstream: FakeUpstream) -> None:
    import aiohttp

    from tests.test_api import TOKENS, VIEWER

    at = 1_800_000_000.004  # an incident opened 4 ms into a second
    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True,
                              clock=lambda: at) as tg, aiohttp.ClientSession() as http:
        await tg.ask("www.tiktok.com")
        headers = {"Authorization": f"Bearer {VIEWER}"}
        base = f"http://127.0.0.1:{tg.http_port}/api/v1/incidents?since="
        for since, expected in (("2027-01-15T08:00:00Z", 1), ("2027-01-15T08:00:00.004Z", 1),
                                ("2027-01-15T08:00:00.005Z", 0), ("2027-01-15T08:00:01Z", 0)):
            async with http.get(base + since, headers=headers) as response:
                assert response.status == 200
                assert len((await response.json())["incidents"]) == expected, since


def _metric_names_in_the_docs() -> dict[str, set[str]]:
    """Each tiktokguard_* name in the README, docs/ and dashboards/, and where it appears."""
    root = Path(__file__).resolve().parent.parent
    named: dict[str, set[str]] = {}
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md")),
                *sorted((root / "dashboards").iterdir())]:
        for name in re.findall(r"\btiktokguard_[a-z_]+[a-z]", doc.read_text()):
            named.setdefault(name, set()).add(doc.name)
    return named


async def test_every_metric_the_docs_name_is_one_a_live_scrape_shows(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """The README, docs/, the dashboard and the alert rules name metrics as /metrics spells
    them (a counter with _total, an info metric with _info, a histogram's _bucket)."""
    named = _metric_names_in_the_docs()
    async with running_daemon(tmp_path, [upstream.address], http=True) as tg, \
            aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{tg.http_port}/metrics") as response:
        text = await response.text()
    scraped = set()
    for family in text_string_to_metric_families(text):
        scraped.add(family.name)
        scraped.update(sample.name for sample in family.samples)
        if family.type == "histogram":  # a family with no samples yet still has these
            scraped.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    # Labelled by URL list: no series until one is configured (this daemon has none); the
    # registry must still declare it under that name.
    only_with_a_url_list = {"tiktokguard_blocklist_fetch_errors_total"}
    declared = set(tg.daemon.metrics.registry._names_to_collectors)
    assert only_with_a_url_list <= declared
    unknown = {name: sorted(docs) for name, docs in named.items()
               if name not in scraped | only_with_a_url_list}
    assert len(named) > 20 and unknown == {}
