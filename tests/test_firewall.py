"""The shipped nftables ruleset with the daemon's sets, on real traffic between namespaces.

Four network namespaces joined by veth pairs, built by the test: a router that runs tiktokguard
(nftables backend) and the shipped `systemd/tiktokguard-nftables.conf`, a managed client, an
allowlisted social media device on a second managed subnet, and a "server" that holds a TikTok
address (the fake upstream's answer for *.tiktokv.com) and an ordinary one. Real TCP connections
and DNS queries from the client and the device show what the firewall lets through.
Needs root, iproute2 and nft (CI has them); skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import reaper
from tests.netns import (
    ROOT,
    SKIP,
    admin_token,
    devices_in,
    exec_in,
    ip,
    process_in,
    python_in,
    wait_event,
)

RULESET = ROOT / "systemd" / "tiktokguard-nftables.conf"
TOKEN = "firewall-test-admin-token"
DEVICE_MAC = "02:00:00:00:00:20"
TIKTOK_V4, TIKTOK_V6 = "192.0.2.66", "2001:db8::66"  # tests/fakes.py: *.tiktokv.com
OTHER_V4, OTHER_V6 = "192.0.2.80", "2001:db8::80"  # an ordinary server

pytestmark = [
    pytest.mark.skipif(bool(SKIP), reason=SKIP or ""),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (apt-get install nftables)"),
]

# Runs in a namespace: try each check, print the outcomes as JSON.
PROBE = """
import json, socket, sys
import dns.message, dns.query, dns.exception
out = []
for kind, host, arg in json.loads(sys.argv[1]):
    if kind == "tcp":
        try:
            socket.create_connection((host, arg), timeout=2).close()
            out.append("open")
        except ConnectionRefusedError:
            out.append("refused")
        except OSError as exc:
            out.append(type(exc).__name__)
    else:
        try:
            reply = dns.query.udp(dns.message.make_query(arg, "A"), host, timeout=2)
            out.append(dns.rcode.to_text(reply.rcode()))
        except dns.exception.Timeout:
            out.append("timeout")
print(json.dumps(out))
"""

# Runs in the server namespace: accept TCP on 443 and 853 (v4 and v6) and close at once.
SERVER = """
import asyncio
async def main():
    async def close(reader, writer):
        writer.close()
    for port in (443, 853):
        await asyncio.start_server(close, "0.0.0.0", port)
        await asyncio.start_server(close, "::", port)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.fixture
def topology() -> Iterator[dict[str, str]]:
    ns = {role: reaper.namespace(f"fw{role}") for role in ("r", "c", "d", "s")}
    try:
        for name in ns.values():
            ip("netns", "add", name)
            ip("-n", name, "link", "set", "lo", "up")
        # (client side, router side, client v4, router v4, client v6, router v6)
        links = {"c": ("10.70.1.10", "10.70.1.1", "fd70:1::10", "fd70:1::1"),
                 "d": ("10.70.2.20", "10.70.2.1", "fd70:2::20", "fd70:2::1"),
                 "s": (TIKTOK_V4, "192.0.2.1", TIKTOK_V6, "2001:db8::1")}
        for i, (role, (v4, gw4, v6, gw6)) in enumerate(links.items(), start=1):
            inner, outer = f"{role}0", f"r{i}"
            ip("link", "add", inner, "netns", ns[role], "type", "veth", "peer", outer,
               "netns", ns["r"])
            if role == "d":
                ip("-n", ns[role], "link", "set", inner, "address", DEVICE_MAC)
            ip("-n", ns[role], "addr", "add", f"{v4}/24", "dev", inner)
            ip("-n", ns[role], "addr", "add", f"{v6}/64", "dev", inner, "nodad")
            ip("-n", ns["r"], "addr", "add", f"{gw4}/24", "dev", outer)
            ip("-n", ns["r"], "addr", "add", f"{gw6}/64", "dev", outer, "nodad")
            for dev, where in ((inner, ns[role]), (outer, ns["r"])):
                ip("-n", where, "link", "set", dev, "up")
            ip("-n", ns[role], "route", "add", "default", "via", gw4)
            ip("-n", ns[role], "-6", "route", "add", "default", "via", gw6)
        ip("-n", ns["s"], "addr", "add", f"{OTHER_V4}/24", "dev", "s0")
        ip("-n", ns["s"], "addr", "add", f"{OTHER_V6}/64", "dev", "s0", "nodad")
        # /proc/sys/net shows the namespace of the process that writes it
        ip("netns", "exec", ns["r"], "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward "
           "&& echo 1 > /proc/sys/net/ipv6/conf/all/forwarding")
        yield ns
    finally:
        for name in ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def ruleset_for_test() -> str:
    """The shipped file with its four defines set to the test's networks."""
    text = RULESET.read_text()
    for name, value in (("managed_v4", "{ 10.70.0.0/16 }"), ("managed_v6", "{ fd70::/16 }"),
                        ("resolver_v4", "10.70.1.1"), ("resolver_v6", "fd70:1::1")):
        text, count = re.subn(rf"^define {name} = .*$", f"define {name} = {value}", text,
                              flags=re.MULTILINE)
        assert count == 1, f"the shipped ruleset should define {name} once"
    return text


async def probe(ns: str, *checks: tuple[str, str, object]) -> list[str]:
    return list(json.loads(await python_in(ns, "-c", PROBE, json.dumps(checks))))


async def devices(ns: str, *args: str) -> dict[str, object]:
    return await devices_in(ns, "http://127.0.0.1:8053", TOKEN, *args)


async def test_shipped_ruleset_blocks_managed_clients_and_lets_the_allowlisted_device_through(
        topology: dict[str, str], tmp_path: Path) -> None:
    router, client, device, server = (topology[r] for r in ("r", "c", "d", "s"))
    await exec_in(router, "nft", "-f", "-", stdin=ruleset_for_test())
    config = tmp_path / "tg.toml"
    config.write_text(f"""
[dns]
listen = ["10.70.1.1:53", "10.70.2.1:53", "[fd70:1::1]:53"]
upstreams = ["127.0.0.1:5300"]
allow_clients = ["10.70.0.0/16", "fd70::/16", "127.0.0.0/8"]
[policy]
managed_networks = ["10.70.0.0/16", "fd70::/16"]
[http]
listen = "127.0.0.1:8053"
{admin_token(TOKEN)}
[netfilter]
backend = "nftables"
[state]
dir = "{tmp_path / 'state'}"
""")
    async with process_in(server, "-c", SERVER, ready="ready"), \
            process_in(router, "-m", "tests.fakes", "127.0.0.1", "5300", ready="ready"), \
            process_in(router, "-m", "tiktokguard", "serve", "--config", str(config),
                       "--log-format", "json", ready="netfilter_exemptions_updated") as daemon:
        phone = await devices(router, "add", "--name", "Comms phone", "--address",
                              "10.70.2.16/28", "--address", "fd70:2::/64", "--custodian", "A",
                              "--supervisor", "B", "--ticket", "SR-1")
        # The managed client asks for a TikTok name: blocked, and shadow resolution puts the
        # name's addresses into the sets.
        assert await probe(client, ("dns", "10.70.1.1", "www.tiktokv.com")) == ["NXDOMAIN"]
        added = 0
        while added < 2:
            added += int(str((await wait_event(daemon, "netfilter_sets_updated"))["added"]))

        tiktok = (("tcp", TIKTOK_V4, 443), ("tcp", TIKTOK_V6, 443))
        assert await probe(client, *tiktok) == ["refused", "refused"]
        assert await probe(device, *tiktok) == ["open", "open"]  # exempt by its networks
        # Ordinary traffic is untouched; DoT to another resolver is not; plain DNS to another
        # resolver is answered by tiktokguard (the TikTok name blocked, others resolved).
        assert await probe(client, ("tcp", OTHER_V4, 443), ("tcp", OTHER_V4, 853),
                           ("dns", OTHER_V4, "www.tiktokv.com"), ("dns", OTHER_V4, "a.test")) \
            == ["open", "refused", "NXDOMAIN", "NOERROR"]
        assert await probe(client, ("tcp", OTHER_V6, 443), ("tcp", OTHER_V6, 853),
                           ("dns", OTHER_V6, "www.tiktokv.com"), ("dns", OTHER_V6, "a.test")) \
            == ["open", "refused", "NXDOMAIN", "NOERROR"]

        # Allowlisted by MAC only: still through (this router is the device's gateway).
        await devices(router, "update", str(phone["id"]), "--mac", DEVICE_MAC)
        await devices(router, "update", str(phone["id"]), "--address", "fd70:9::/64")
        assert await probe(device, *tiktok) == ["open", "open"]
        assert await probe(client, *tiktok) == ["refused", "refused"]

        # Loading the file again (after an edit) keeps what the daemon wrote, and no rule twice.
        await exec_in(router, "nft", "-f", "-", stdin=ruleset_for_test())
        assert await probe(client, *tiktok) == ["refused", "refused"]
        assert await probe(device, *tiktok) == ["open", "open"]
        chain = await exec_in(router, "nft", "list", "chain", "inet", "tiktokguard", "forward")
        assert chain.count("jump tiktok") == 2

        # The firewall is reloaded the Debian way (`flush ruleset`, then the files): the sets are
        # made anew, empty, and the managed client gets through...
        await exec_in(router, "nft", "flush", "ruleset")
        await exec_in(router, "nft", "-f", "-", stdin=ruleset_for_test())
        assert await probe(client, *tiktok) == ["open", "open"]
        # ...until tiktokguard notices (every 10 s, or at once on SIGHUP) and writes it all again.
        daemon.send_signal(signal.SIGHUP)
        restored = await wait_event(daemon, "netfilter_sets_restored")
        assert (restored["addresses"], restored["exemptions"]) == (2, 2)
        assert await probe(device, *tiktok) == ["open", "open"]
        assert await probe(client, *tiktok) == ["refused", "refused"]

        # Deactivated: the device leaves the exemption sets before the API answers.
        await devices(router, "deactivate", str(phone["id"]))
        assert await probe(device, *tiktok) == ["refused", "refused"]
        listing = json.loads(await exec_in(router, "nft", "-j", "list", "table", "inet",
                                           "tiktokguard"))
        sets = {i["set"]["name"]: i["set"] for i in listing["nftables"] if "set" in i}
        assert all("elem" not in sets[name] for name in ("exempt_v4", "exempt_v6", "exempt_mac"))
        counters = [rule for item in listing["nftables"] if "rule" in item
                    for rule in [item["rule"]] if rule["chain"] == "tiktok"]
        assert any(e.get("counter", {}).get("packets", 0) >= 4
                   for rule in counters for e in rule["expr"])
