"""Recognising a social media device by MAC from the kernel neighbour table.

The in-process tests feed the table from a stub; the end-to-end test builds two network
namespaces joined by veth pairs (a resolver host and a client host), runs the real daemon in one
and a real DNS client in the other, and lets real ARP fill the resolver's neighbour table.
It needs root and `ip netns` (CI runs as root); elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import reaper
from tests.conftest import DEVICE_IP, Running
from tests.netns import SKIP, admin_token, devices_in, ip, process_in, python_in


def soa_owner(reply: object) -> str:
    return reply.authority[0].name.to_text()  # type: ignore[attr-defined]


async def test_neighbour_mac_exempts_device_on_its_first_query(tg: Running) -> None:
    neighbours = tg.daemon.neighbours
    assert neighbours is not None
    dumps: list[int] = []

    def dump() -> dict[str, str]:
        dumps.append(1)
        return {DEVICE_IP: "02:00:5e:aa:00:02", "127.0.0.21": "02:00:5e:aa:00:03"}

    neighbours.dump = dump
    await tg.add_device(macs=["02:00:5e:aa:00:02"])
    # The very first query of the device: the table has not been read yet, so the resolver reads
    # it before deciding, and the device is exempt at once.
    assert soa_owner(await tg.ask("www.tiktok.com", source=DEVICE_IP)) == "test."
    # Another MAC is still blocked; its address was in the fresh dump, so no second dump.
    before = len(dumps)
    assert soa_owner(await tg.ask("www.tiktok.com", source="127.0.0.21")) == "tiktok.com."
    assert len(dumps) == before
    # An address not in the table waits for one dump at most, then is blocked without waiting.
    assert soa_owner(await tg.ask("www.tiktok.com", source="127.0.0.22")) == "tiktok.com."
    after_first = len(dumps)
    assert soa_owner(await tg.ask("www.tiktok.com", source="127.0.0.22")) == "tiktok.com."
    assert len(dumps) == after_first


async def test_neighbour_table_not_read_without_mac_devices(tg: Running) -> None:
    neighbours = tg.daemon.neighbours
    assert neighbours is not None

    def dump() -> dict[str, str]:
        raise AssertionError("the table must not be read when no device is listed by MAC")

    neighbours.dump = dump
    await tg.add_device(addresses=[DEVICE_IP])
    assert soa_owner(await tg.ask("www.tiktok.com", source="127.0.0.21")) == "tiktok.com."


async def test_unreadable_neighbour_table_is_counted_not_fatal(tg: Running) -> None:
    neighbours = tg.daemon.neighbours
    assert neighbours is not None

    def dump() -> dict[str, str]:
        raise PermissionError("netlink says no")

    neighbours.dump = dump
    await tg.add_device(macs=["02:00:5e:aa:00:02"])
    assert soa_owner(await tg.ask("www.tiktok.com", source=DEVICE_IP)) == "tiktok.com."
    assert tg.metrics.sample("tiktokguard_neighbour_table_errors_total") >= 1


# -- end to end in network namespaces -------------------------------------------------------------


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """srv (resolver host) and cli (client host): 10.231.0.1/24 ↔ 10.231.0.2/24 and
    10.231.1.1/24 ↔ 10.231.1.2/24 on two veth pairs, so the client has two MACs."""
    if SKIP:
        pytest.skip(SKIP)
    tag = str(os.getpid())[-5:]
    srv, cli = reaper.namespace("srv"), reaper.namespace("cli")
    ip("netns", "add", srv)
    ip("netns", "add", cli)
    try:
        for n, (a, b) in enumerate((("A", "0"), ("B", "1"))):
            s_if, c_if = f"tgs{a}{tag}", f"tgc{a}{tag}"
            ip("link", "add", s_if, "type", "veth", "peer", "name", c_if)
            ip("link", "set", s_if, "netns", srv)
            ip("link", "set", c_if, "netns", cli)
            ip("-n", cli, "link", "set", c_if, "address", f"02:00:5e:aa:0{n}:02")
            ip("-n", srv, "addr", "add", f"10.231.{b}.1/24", "dev", s_if)
            ip("-n", cli, "addr", "add", f"10.231.{b}.2/24", "dev", c_if)
            ip("-n", srv, "link", "set", s_if, "up")
            ip("-n", cli, "link", "set", c_if, "up")
        ip("-n", srv, "link", "set", "lo", "up")
        ip("-n", cli, "link", "set", "lo", "up")
        yield srv, cli
    finally:
        subprocess.run(["ip", "netns", "del", srv], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", cli], capture_output=True, timeout=30)


QUERY = """
import sys, dns.message, dns.query
q = dns.message.make_query("www.tiktok.com", "A")
r = dns.query.udp(q, sys.argv[1], port=5353, source=sys.argv[2], timeout=3)
print(r.authority[0].name.to_text())
"""


async def test_mac_from_kernel_neighbour_table_in_namespaces(
        namespaces: tuple[str, str], tmp_path: Path) -> None:
    srv, cli = namespaces
    token = "netns-admin-token"
    config = tmp_path / "tg.toml"
    config.write_text(f"""
[dns]
listen = ["10.231.0.1:5353", "10.231.1.1:5353"]
upstreams = ["127.0.0.1:5300"]
allow_clients = ["10.231.0.0/16"]
[policy]
managed_networks = ["10.231.0.0/16"]
[http]
listen = "10.231.0.1:8053"
{admin_token(token)}
[state]
dir = "{tmp_path / 'state'}"
""")
    async with process_in(srv, "-m", "tests.fakes", "127.0.0.1", "5300", ready="ready"), \
            process_in(srv, "-m", "tiktokguard", "serve", "--config", str(config),
                       "--log-format", "json", ready='"started"'):
        # Before any device: both client interfaces are blocked.
        assert (await python_in(cli, "-c", QUERY, "10.231.0.1", "10.231.0.2")).strip() \
            == "tiktok.com."
        # IT allowlists the phone by the MAC of the client's first interface.
        phone = await devices_in(cli, "http://10.231.0.1:8053", token, "add", "--name", "phone",
                                 "--mac", "02:00:5e:aa:00:02", "--custodian", "c",
                                 "--supervisor", "s", "--ticket", "SR-9")
        assert phone["macs"] == ["02:00:5e:aa:00:02"]
        # Its next query is resolved (the fake upstream's answer, not a block)...
        assert (await python_in(cli, "-c", QUERY, "10.231.0.1", "10.231.0.2")).strip() == "test."
        # ...while the other interface (another MAC) is still blocked.
        assert (await python_in(cli, "-c", QUERY, "10.231.1.1", "10.231.1.2")).strip() \
            == "tiktok.com."
