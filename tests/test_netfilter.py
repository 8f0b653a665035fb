"""The network-level backstop: addresses of blocked names into kernel sets.

In-process tests use a recording backend; the namespace tests write real nftables and ipset sets
inside a network namespace the test creates (root and iproute2 needed; CI has both).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from tests import reaper
from tests.conftest import UNMANAGED, Running, running_daemon
from tests.daemons import within
from tests.fakes import FakeUpstream
from tests.netns import (
    ENV,
    ROOT,
    SKIP,
    admin_token,
    devices_in,
    process_in,
    python_in,
    wait_event,
)
from tiktokguard.daemon import Daemon
from tiktokguard.dns.wire import index_response
from tiktokguard.netfilter import Element, Exemptions, interval
from tiktokguard.policy.clients import Device


class Recorder:
    """A KernelSets backend that remembers what it was asked to write."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.writes: list[tuple[list[Element], list[Element], set[str]]] = []
        self.exemptions: list[Exemptions] = []
        self.generation: object = ("sets", 1)  # a new value: the sets were made anew
        self.unavailable = False
        self.loop = asyncio.get_running_loop()
        self.added: asyncio.Queue[list[Element]] = asyncio.Queue()  # each add, as it happens

    def ensure(self) -> object:
        if self.unavailable:
            raise PermissionError("netlink: operation not permitted")
        return self.generation

    def add(self, v4: list[Element], v6: list[Element], refresh: set[str]) -> None:
        if self.fail:
            raise PermissionError("netlink: operation not permitted")
        self.writes.append((v4, v6, refresh))
        self.loop.call_soon_threadsafe(self.added.put_nowait, v4 + v6)  # (called in a thread)

    def exempt(self, exemptions: Exemptions) -> None:
        if self.fail:
            raise PermissionError("netlink: operation not permitted")
        self.exemptions.append(exemptions)


@asynccontextmanager
async def with_recorder(tmp_path: Path, upstream: FakeUpstream, recorder: Recorder,
                        extra: str = "", **options: Any) -> AsyncIterator[Running]:
    config = '[netfilter]\nbackend = "nftables"\nmin_timeout = 60\nmax_timeout = 3600\n' + extra

    def use_recorder(daemon: Daemon) -> None:
        # Before start: the real backend must never touch this host's firewall.
        assert daemon.core.backstop is not None
        daemon.core.backstop.backend = recorder

    async with running_daemon(tmp_path, [upstream.address], extra=config,
                              prepare=use_recorder, **options) as tg:
        assert tg.daemon.core.backstop is not None
        # the sets checked, the exemptions written
        await within(10, tg.daemon.core.backstop.started.wait(), "the backstop's start")
        yield tg


async def written(tg: Running, recorder: Recorder) -> tuple[list[Element], list[Element]]:
    """Everything written so far, after the next flush."""
    backstop = tg.daemon.core.backstop
    assert backstop is not None
    await backstop.flush()
    v4 = [e for w in recorder.writes for e in w[0]]
    v6 = [e for w in recorder.writes for e in w[1]]
    return v4, v6


async def test_shadow_resolution_learns_addresses_of_a_blocked_name(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    recorder = Recorder()
    async with with_recorder(tmp_path, upstream, recorder) as tg:
        reply = await tg.ask("api.tiktokv.com")
        assert reply.authority[0].name.to_text() == "tiktokv.com."  # blocked, at once
        backstop = tg.daemon.core.backstop
        assert backstop is not None
        await asyncio.gather(*backstop.shadow_tasks)
        v4, v6 = await written(tg, recorder)
        # TTL 30 raised to min_timeout 60; TTL 1 000 000 lowered to max_timeout 3600.
        assert v4 == [("192.0.2.66", 60)] and v6 == [("2001:db8::66", 3600)]
        # Each name is resolved once per min_timeout, however often it is blocked.
        for _ in range(5):
            await tg.ask("api.tiktokv.com")
        assert upstream.count("api.tiktokv.com") == 2  # A and AAAA, once
        assert tg.metrics.sample("tiktokguard_netfilter_shadow_queries_total",
                                 result="resolved") == 2


async def test_answers_to_unmanaged_clients_feed_the_sets_but_cdn_addresses_never(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    recorder = Recorder()
    async with with_recorder(tmp_path, upstream, recorder,
                             "shadow_resolution = false") as tg:
        assert (await tg.ask("www.tiktokv.com", source=UNMANAGED)).answer
        assert (await tg.ask("alias.tiktokv.com", source=UNMANAGED)).answer
        assert (await tg.ask("a.test", source=UNMANAGED)).answer  # not listed: not learned
        v4, v6 = await written(tg, recorder)
        assert v4 == [("192.0.2.66", 60)] and v6 == []
        assert ("198.51.100.7", 300) not in v4  # the CDN behind the CNAME stays reachable
        assert tg.metrics.sample("tiktokguard_netfilter_entries_added_total") == 1


async def test_refresh_only_when_past_half_the_timeout(tmp_path: Path,
                                                       upstream: FakeUpstream) -> None:
    recorder = Recorder()
    async with with_recorder(tmp_path, upstream, recorder, "shadow_resolution = false") as tg:
        backstop = tg.daemon.core.backstop
        assert backstop is not None
        now = [1000.0]
        backstop.clock = lambda: now[0]
        wire = (await tg.ask("www.tiktokv.com", source=UNMANAGED)).to_wire()
        index = index_response(wire)
        await backstop.flush()
        backstop.answer(wire, index)
        now[0] += 10  # well within the 60 s: nothing to write
        await backstop.flush()
        assert len(recorder.writes) == 1
        backstop.answer(wire, index)
        now[0] += 25  # past half: delete and add again, with the new timeout
        await backstop.flush()
        assert recorder.writes[-1] == ([("192.0.2.66", 60)], [], {"192.0.2.66"})
        now[0] += 61
        await backstop.flush()
        assert tg.metrics.sample("tiktokguard_netfilter_entries_expired_total") == 1


async def test_failing_kernel_writes_are_counted_and_dns_goes_on(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    recorder = Recorder(fail=True)
    async with with_recorder(tmp_path, upstream, recorder) as tg:
        for _ in range(3):
            assert (await tg.ask("x.tiktokv.com")).rcode() == 3
        backstop = tg.daemon.core.backstop
        assert backstop is not None
        await asyncio.gather(*backstop.shadow_tasks)
        await backstop.flush()
        assert tg.metrics.sample("tiktokguard_netfilter_errors_total") >= 1
        assert recorder.writes == []
        assert (await tg.ask("a.test")).answer


async def test_shadow_resolution_is_rate_limited(tmp_path: Path, upstream: FakeUpstream) -> None:
    recorder = Recorder()
    async with with_recorder(tmp_path, upstream, recorder, "shadow_per_second = 2") as tg:
        for i in range(10):
            await tg.ask(f"n{i}.tiktokv.com")
        backstop = tg.daemon.core.backstop
        assert backstop is not None
        await asyncio.gather(*backstop.shadow_tasks)
        skipped = tg.metrics.sample("tiktokguard_netfilter_shadow_queries_total",
                                    result="skipped")
        assert skipped >= 7  # 2 tokens at the start, 2 more per second at most
        assert sum(upstream.count(f"n{i}.tiktokv.com") for i in range(10)) <= 2 * (10 - skipped)


# -- real kernel sets in a network namespace ------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    if SKIP:
        pytest.skip(SKIP)
    name = reaper.namespace("nf")
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


QUERY = """
import sys, dns.message, dns.query
r = dns.query.udp(dns.message.make_query(sys.argv[1], "A"), "127.0.0.1", port=5353, timeout=3)
print(r.rcode())
"""


API = "http://127.0.0.1:8053"
TOKEN = "netfilter-test-admin-token"


def namespace_config(tmp_path: Path, backend: str) -> Path:
    """A config for a daemon in a test namespace: DNS on 127.0.0.1:5353 forwarding to a fake
    upstream on :5300, the API on API with TOKEN as an admin token."""
    config = tmp_path / "tg.toml"
    config.write_text(f"""
[dns]
listen = ["127.0.0.1:5353"]
upstreams = ["127.0.0.1:5300"]
allow_clients = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "2001:db8::/32"]
[http]
listen = "{API.removeprefix('http://')}"
{admin_token(TOKEN)}
[netfilter]
backend = "{backend}"
[state]
dir = "{tmp_path / 'state'}"
""")
    return config


async def run_backstop_in(netns: str, tmp_path: Path, backend: str) -> None:
    config = namespace_config(tmp_path, backend)
    async with process_in(netns, "-m", "tests.fakes", "127.0.0.1", "5300", ready="ready"), \
            process_in(netns, "-m", "tiktokguard", "serve", "--config", str(config),
                       "--log-format", "json", ready="netfilter_ready") as daemon:
        assert (await python_in(netns, "-c", QUERY, "www.tiktokv.com")).strip() == "3"  # NXDOMAIN
        added = 0
        while added < 2:  # the A and the AAAA answer may come in one batch or in two
            added += int(str((await wait_event(daemon, "netfilter_sets_updated"))["added"]))
        assert added == 2


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (apt-get install nftables)")
async def test_nftables_set_holds_learned_addresses_with_timeouts(netns: str,
                                                                  tmp_path: Path) -> None:
    await run_backstop_in(netns, tmp_path, "nftables")
    listing = json.loads((await asyncio.to_thread(
        subprocess.run,
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet", "tiktokguard"],
        capture_output=True, text=True, check=True, timeout=30)).stdout)
    sets = {item["set"]["name"]: item["set"] for item in listing["nftables"] if "set" in item}
    (v4,) = sets["tiktok_v4"]["elem"]
    (v6,) = sets["tiktok_v6"]["elem"]
    assert v4["elem"]["val"] == "192.0.2.66" and v4["elem"]["timeout"] == 60
    assert v6["elem"]["val"] == "2001:db8::66" and v6["elem"]["timeout"] == 86400


@pytest.mark.skipif(shutil.which("ipset") is None, reason="needs ipset (apt-get install ipset)")
async def test_ipset_holds_learned_addresses_with_timeouts(netns: str, tmp_path: Path) -> None:
    await run_backstop_in(netns, tmp_path, "ipset")
    for name, address, timeout in (("tiktok_v4", "192.0.2.66", 60),
                                   ("tiktok_v6", "2001:db8::66", 86400)):
        listing = (await asyncio.to_thread(
            subprocess.run, ["ip", "netns", "exec", netns, "ipset", "list", name],
            capture_output=True, text=True, check=True, timeout=30)).stdout
        entry = next(line for line in listing.splitlines() if line.startswith(address))
        assert 0 < int(entry.split("timeout")[1]) <= timeout


# -- the exemption sets: allowlisted devices, in step with the store -------------------------------


async def test_exemption_sets_follow_the_device_store(tmp_path: Path,
                                                      upstream: FakeUpstream) -> None:
    recorder = Recorder()
    served = ('[dns]\nallow_clients = ["127.0.0.0/15", "::1/128", "10.9.0.0/16", '
              '"2001:db8:5::/48"]\n')  # (device addresses must be served ones)
    async with with_recorder(tmp_path, upstream, recorder, served) as tg:
        backstop = tg.daemon.core.backstop
        assert backstop is not None
        assert recorder.exemptions == [Exemptions()]  # written on start, even when empty
        service = tg.daemon.devices_service
        assert service is not None
        device = await tg.add_device(
            addresses=["127.0.0.20", "10.9.0.0/29", "10.9.0.8/29", "2001:db8:5::/48"],
            macs=["02-00-5E-AA-00-02"])
        # In force when the change returns: adjacent networks merged, MACs normalised.
        assert recorder.exemptions[-1] == Exemptions(
            v4=(ip_network("10.9.0.0/28"), ip_network("127.0.0.20/32")),
            v6=(ip_network("2001:db8:5::/48"),), macs=("02:00:5e:aa:00:02",))
        tg.daemon.refresh_gauges()  # as a scrape does
        assert tg.metrics.sample("tiktokguard_netfilter_exempt_entries") == 4
        await service.update(device, {"name": "renamed"}, "test")
        assert len(recorder.exemptions) == 2  # nothing the sets hold changed: no write
        await service.update(device, {"macs": []}, "test")
        assert recorder.exemptions[-1].macs == ()
        await service.deactivate(device, "test")
        assert recorder.exemptions[-1] == Exemptions()


async def test_an_expired_device_leaves_the_exemption_sets(tmp_path: Path,
                                                           upstream: FakeUpstream) -> None:
    recorder = Recorder()
    now = [time.time()]
    async with with_recorder(tmp_path, upstream, recorder, clock=lambda: now[0]) as tg:
        backstop = tg.daemon.core.backstop
        assert backstop is not None
        soon = datetime.fromtimestamp(now[0] + 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await tg.add_device(addresses=["127.0.0.20"], expires_at=soon)
        assert recorder.exemptions[-1].v4 == (ip_network("127.0.0.20/32"),)
        now[0] += 7200
        await backstop.sync_exemptions()  # what the background loop does every 30 s
        assert recorder.exemptions[-1] == Exemptions()


async def test_a_failed_exemption_write_is_counted_and_written_again(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    recorder = Recorder(fail=True)
    async with with_recorder(tmp_path, upstream, recorder) as tg:
        backstop = tg.daemon.core.backstop
        assert backstop is not None
        await tg.add_device(addresses=["127.0.0.20"])  # the store takes it; the kernel does not
        assert tg.metrics.sample("tiktokguard_netfilter_errors_total") == 2
        assert backstop.exempt_written is None
        assert (await tg.ask("www.tiktokv.com", source="127.0.0.20")).answer  # DNS: exempt
        recorder.fail = False
        await backstop.sync_exemptions()
        assert recorder.exemptions == [Exemptions(v4=(ip_network("127.0.0.20/32"),))]


def kernel_exemptions(netns: str, backend: str) -> set[str]:
    """What the kernel's exemption sets hold, as text."""
    found: set[str] = set()
    if backend == "nftables":
        listing = json.loads(subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet", "tiktokguard"],
            capture_output=True, text=True, check=True, timeout=30).stdout)
        for item in listing["nftables"]:
            if "set" in item and item["set"]["name"].startswith("exempt_"):
                for elem in item["set"].get("elem", []):
                    prefix = elem.get("prefix") if isinstance(elem, dict) else None
                    found.add(f"{prefix['addr']}/{prefix['len']}" if prefix else str(elem))
        return found
    for name in ("exempt_v4", "exempt_v6"):
        listing = subprocess.run(["ip", "netns", "exec", netns, "ipset", "list", name],
                                 capture_output=True, text=True, check=True, timeout=30).stdout
        found.update(listing.split("Members:\n", 1)[1].split())
    return found


@pytest.mark.parametrize("backend", ["nftables", "ipset"])
async def test_kernel_exemption_sets_follow_device_changes(netns: str, tmp_path: Path,
                                                          backend: str) -> None:
    if shutil.which("nft" if backend == "nftables" else "ipset") is None:
        pytest.skip(f"needs the {backend} tool to read the sets")
    config = namespace_config(tmp_path, backend)

    async def cli(*args: str) -> dict[str, Any]:
        return await devices_in(netns, API, TOKEN, *args)

    async with process_in(netns, "-m", "tiktokguard", "serve", "--config", str(config),
                          "--log-format", "json", ready="netfilter_exemptions_updated"):
        phone = await cli("add", "--name", "Comms phone", "--address", "10.9.0.0/29",
                          "--address", "10.9.0.8/29", "--address", "2001:db8:5::/48",
                          "--address", "10.70.2.20", "--custodian", "A", "--supervisor", "B",
                          "--ticket", "SR-1")
        held = await asyncio.to_thread(kernel_exemptions, netns, backend)
        assert held == {"10.9.0.0/28", "2001:db8:5::/48", "10.70.2.20"}
        await cli("deactivate", str(phone["id"]))
        assert await asyncio.to_thread(kernel_exemptions, netns, backend) == set()


async def test_sets_made_anew_are_filled_again(tmp_path: Path, upstream: FakeUpstream) -> None:
    recorder = Recorder()
    async with with_recorder(tmp_path, upstream, recorder, "shadow_resolution = false") as tg:
        backstop = tg.daemon.core.backstop
        assert backstop is not None
        await tg.add_device(addresses=["127.0.0.20"])
        await tg.ask("www.tiktokv.com", source=UNMANAGED)
        await backstop.flush()
        writes, exemptions = len(recorder.writes), len(recorder.exemptions)
        await backstop.check_sets()  # the same sets: nothing to do
        assert (len(recorder.writes), len(recorder.exemptions)) == (writes, exemptions)
        recorder.generation = ("sets", 2)  # e.g. `flush ruleset` and the files loaded again
        await backstop.check_sets()
        (address, timeout), = recorder.writes[-1][0]
        assert address == "192.0.2.66" and 55 <= timeout <= 61  # what was left of its 60 s
        assert recorder.exemptions[-1].v4 == (ip_network("127.0.0.20/32"),)
        assert len(recorder.exemptions) == exemptions + 1


async def test_a_backend_unavailable_at_start_is_tried_again(tmp_path: Path,
                                                            upstream: FakeUpstream) -> None:
    recorder = Recorder()
    recorder.unavailable = True
    async with with_recorder(tmp_path, upstream, recorder) as tg:
        backstop = tg.daemon.core.backstop
        assert backstop is not None
        assert not backstop.ready and recorder.exemptions == []
        assert tg.metrics.sample("tiktokguard_netfilter_errors_total") == 1
        assert (await tg.ask("a.test")).answer  # DNS as usual
        await tg.add_device(addresses=["127.0.0.20"])  # nothing written while unavailable
        recorder.unavailable = False
        await backstop.check_sets()  # what the loop does every 10 s (or on SIGHUP)
        await backstop.sync_exemptions()
        assert backstop.ready
        assert recorder.exemptions == [Exemptions(v4=(ip_network("127.0.0.20/32"),))]


@pytest.mark.parametrize(("network", "expected"), [
    ("10.70.2.20/32", ("10.70.2.20", "10.70.2.21")),
    ("10.9.0.0/29", ("10.9.0.0", "10.9.0.8")),
    ("255.255.255.0/24", ("255.255.255.0", None)),  # open at the top: no end element
    ("2001:db8:5::/48", ("2001:db8:5::", "2001:db8:6::")),
    ("ffff::/16", ("ffff::", None)),
])
def test_interval_bounds(network: str, expected: tuple[str, str | None]) -> None:
    assert interval(ip_network(network)) == expected


def test_exemptions_skip_inactive_and_expired_devices_and_merge_networks() -> None:
    devices = [
        Device("a", "a", (ip_network("10.0.0.0/25"), ip_network("2001:db8::1/128")),
               ("02:00:00:00:00:01",)),
        Device("b", "b", (ip_network("10.0.0.128/25"), ip_network("10.0.0.7/32"))),
        Device("c", "c", (ip_network("10.9.9.9/32"),), ("02:00:00:00:00:03",), active=False),
        Device("d", "d", (ip_network("10.8.8.8/32"),), expires_at=100.0),
    ]
    assert Exemptions.of(devices, now=200.0) == Exemptions(
        v4=(ip_network("10.0.0.0/24"),), v6=(ip_network("2001:db8::1/128"),),
        macs=("02:00:00:00:00:01",))
    assert ip_network("10.8.8.8/32") in Exemptions.of(devices, now=50.0).v4


WRITE_MANY = """
from tiktokguard.config import NetfilterConfig
from tiktokguard.netfilter.nftables import NftablesSets
sets = NftablesSets(NetfilterConfig(backend="nftables"))
sets.ensure()
sets.add([(f"10.0.{i >> 8}.{i & 255}", 600) for i in range(3000)],
         [(f"2001:db8::{i:x}", 600) for i in range(3000)], set())
sets.add([("10.0.0.1", 900)], [], {"10.0.0.1"})  # a refresh: deleted and added in one go
"""


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (apt-get install nftables)")
def test_nftables_writes_thousands_of_addresses(netns: str) -> None:
    # One netlink attribute holds at most 64 KiB: big writes go in batches.
    subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", WRITE_MANY], cwd=ROOT,
                   env=ENV, check=True, timeout=30)
    listing = json.loads(subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet", "tiktokguard"],
        capture_output=True, text=True, check=True, timeout=30).stdout)
    sets = {item["set"]["name"]: item["set"] for item in listing["nftables"] if "set" in item}
    assert len(sets["tiktok_v4"]["elem"]) == 3000 and len(sets["tiktok_v6"]["elem"]) == 3000
    refreshed = next(e["elem"] for e in sets["tiktok_v4"]["elem"]
                     if isinstance(e, dict) and e["elem"]["val"] == "10.0.0.1")
    assert refreshed["timeout"] == 900


async def test_sighup_writes_everything_again_when_the_backend_cannot_tell(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    recorder = Recorder()
    recorder.generation = None  # as ipset: no way to see that a set was flushed
    async with with_recorder(tmp_path, upstream, recorder, "shadow_resolution = false") as tg:
        await tg.ask("www.tiktokv.com", source=UNMANAGED)
        assert await asyncio.wait_for(recorder.added.get(), 10) == [("192.0.2.66", 60)]
        assert await tg.daemon.reload("SIGHUP")  # what `systemctl reload` does
        again = await asyncio.wait_for(recorder.added.get(), 10)
        assert [a for a, _t in again] == ["192.0.2.66"]


async def test_names_blocked_before_the_backstop_is_ready_are_learned_when_it_is(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    recorder = Recorder()
    recorder.unavailable = True  # (as at start, before the first check, or without the sets)
    async with with_recorder(tmp_path, upstream, recorder) as tg:
        backstop = tg.daemon.core.backstop
        assert backstop is not None and not backstop.ready
        assert (await tg.ask("api.tiktokv.com")).rcode() == 3  # blocked at once all the same
        assert list(backstop.early) == [b"\x03api\x07tiktokv\x03com\x00"]
        recorder.unavailable = False
        await backstop.check_sets()
        await asyncio.gather(*backstop.shadow_tasks)
        v4, v6 = await written(tg, recorder)
        assert v4 == [("192.0.2.66", 60)] and v6 == [("2001:db8::66", 3600)]
        assert backstop.early == {}


FIRST_QUERY = """
import sys, time, dns.exception, dns.message, dns.query
query = dns.message.make_query(sys.argv[1], "A")
deadline = time.monotonic() + 20
while True:  # from the daemon's launch on: the first query it answers at all
    try:
        reply = dns.query.udp(query, "127.0.0.1", port=5353, timeout=0.005)
        break
    except (dns.exception.Timeout, ConnectionRefusedError, OSError):
        if time.monotonic() > deadline:
            raise
print(reply.rcode())
"""


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (apt-get install nftables)")
async def test_a_name_blocked_as_the_daemon_starts_is_learned(netns: str, tmp_path: Path) -> None:
    # A managed client blocked in the very first moments (the DNS port just opened, the kernel
    # sets not checked yet, /readyz not yet green) must still see the name's addresses learned.
    config = namespace_config(tmp_path, "nftables")
    async with process_in(netns, "-m", "tests.fakes", "127.0.0.1", "5300", ready="ready"):
        first = asyncio.create_task(python_in(netns, "-c", FIRST_QUERY, "www.tiktokv.com"))
        async with process_in(netns, "-m", "tiktokguard", "serve", "--config", str(config),
                              "--log-format", "json", ready='"started"') as daemon:
            assert (await first).strip() == "3"  # NXDOMAIN: blocked
            ready = await wait_event(daemon, "netfilter_ready")
            added = 0
            while added < 2:
                added += int(str((await wait_event(daemon, "netfilter_sets_updated"))["added"]))
    assert ready["queued"] == 1  # it was blocked before the backend was ready
    listing = json.loads((await asyncio.to_thread(
        subprocess.run,
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet", "tiktokguard"],
        capture_output=True, text=True, check=True, timeout=30)).stdout)
    sets = {item["set"]["name"]: item["set"] for item in listing["nftables"] if "set" in item}
    assert [e["elem"]["val"] for e in sets["tiktok_v4"]["elem"]] == ["192.0.2.66"]


async def test_readyz_waits_for_the_backstop_and_names_it(tmp_path: Path,
                                                          upstream: FakeUpstream) -> None:
    import threading

    import aiohttp

    gate = threading.Event()

    class SlowToStart(Recorder):
        def ensure(self) -> object:
            gate.wait(10)  # the kernel sets not checked yet
            return super().ensure()

    recorder = SlowToStart()

    def use_recorder(daemon: Daemon) -> None:
        assert daemon.core.backstop is not None
        daemon.core.backstop.backend = recorder

    config = '[netfilter]\nbackend = "nftables"\n'
    async with running_daemon(tmp_path, [upstream.address], extra=config, http=True,
                              prepare=use_recorder) as tg, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{tg.http_port}/readyz"
        try:
            async with http.get(url) as response:
                body = await response.json()
                assert response.status == 503
                assert body["components"]["backstop"] == {"ready": False, "state": "starting"}
                assert body["problems"] == ["backstop: starting"]
                assert all(c["ready"] for name, c in body["components"].items()
                           if name != "backstop")
        finally:
            gate.set()
        backstop = tg.daemon.core.backstop
        assert backstop is not None
        await within(10, backstop.started.wait(), "the backstop's start")
        async with http.get(url) as response:
            body = await response.json()
            assert response.status == 200, body
            assert body["components"]["backstop"] == {"ready": True, "state": "ready"}
