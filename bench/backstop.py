#!/usr/bin/env python3
"""The network-level backstop's cost, side by side with dnsmasq's --nftset, in a network namespace.

An upstream dnsmasq answers names under tiktokv.com (a listed domain), each with an address of its
own. Four servers forward them to loopback clients that are *not* in a managed network, so the
answers go through and their addresses are learned:

  tg-off        tiktokguard, [netfilter] backend = "off"
  tg-nftables   tiktokguard, [netfilter] backend = "nftables" (set inet tiktokguard tiktok_v4)
  dnsmasq       dnsmasq forwarding, no sets
  dnsmasq-nft   dnsmasq --nftset=/tiktokv.com/4#inet#peer#tiktok_v4

Every run asks names that no server has seen (every query forwarded, every answer a new address:
the worst case for the set writer). Prints q/s, lost queries, server CPU per 100k queries, and how
many addresses each kernel set holds at the end against the names answered with NOERROR (an
answer that failed upstream, SERVFAIL, has no address to learn).

    sudo python3 bench/backstop.py                 # 2 rounds of 30 000 names per server
    sudo python3 bench/backstop.py --names 10000 --rounds 1

Needs root (it creates, and deletes, its own network namespace: no traffic or firewall change
outside it), iproute2, nft, dnsperf and dnsmasq (Debian: apt-get install iproute2 nftables
dnsperf dnsmasq-base). Bounded: each dnsperf run stops after --seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402 - after the path set-up above
    LOCAL,
    Result,
    Server,
    free_port,
    need,
    run_dnsperf,
    start_dnsmasq,
    start_tiktokguard,
    start_upstream,
    stop_all,
    wait_for_dns,
    write_queries,
)

INSIDE = "TIKTOKGUARD_BENCH_NETNS"


def set_size(family_table_set: tuple[str, str, str]) -> int:
    out = subprocess.run(["nft", "-j", "list", "set", *family_table_set], capture_output=True,
                         text=True, check=True).stdout
    for item in json.loads(out)["nftables"]:
        if "set" in item:
            return len(item["set"].get("elem", []))
    return 0


def settled_size(family_table_set: tuple[str, str, str], seconds: float = 10) -> int:
    """The set's size once it stops growing (tiktokguard writes in 0.5 s batches)."""
    deadline = time.monotonic() + seconds
    size = set_size(family_table_set)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = set_size(family_table_set)
        if now == size:
            break
        size = now
    return size


def inside(args: argparse.Namespace) -> None:
    dnsperf = need("dnsperf", "dnsperf")
    dnsmasq = need("dnsmasq", "dnsmasq-base")
    need("nft", "nftables")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    total = args.names * args.rounds * 4
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="tiktokguard-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            hosts = tmp / "zone.hosts"
            hosts.write_text("".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} "
                                     f"n{i}.tiktokv.com\n" for i in range(total)))
            upstream = start_upstream(dnsmasq, hosts, "tiktokv.com")
            servers.append(upstream)

            subprocess.run(["nft", "-f", "-"], input="table inet peer {\n"
                           "  set tiktok_v4 { type ipv4_addr; }\n}\n", text=True, check=True)
            servers.append(start_dnsmasq(dnsmasq, "dnsmasq", upstream))
            servers.append(start_dnsmasq(dnsmasq, "dnsmasq-nft", upstream,
                                         "--nftset=/tiktokv.com/4#inet#peer#tiktok_v4"))
            for name, backend in (("tg-off", "off"), ("tg-nftables", "nftables")):
                port = free_port()
                config = tmp / f"{name}.toml"
                config.write_text(f"""
[dns]
listen = ["{LOCAL}:{port}"]
upstreams = ["{LOCAL}:{upstream.port}"]
cache_size = 200000
[policy]
managed_networks = ["192.0.2.0/24"]   # loopback clients are unmanaged: answers go through
[http]
listen = ""
[netfilter]
backend = "{backend}"
min_timeout = 3600
[state]
dir = "{tmp / name}"
""")
                servers.append(start_tiktokguard(name, port, config))
            for server in servers[1:]:
                wait_for_dns(server.port)  # (asks n0.bench.test: refused or NXDOMAIN, fine)

            contenders = servers[1:]
            table: dict[str, list[Result]] = {}
            names = [f"n{i}.tiktokv.com" for i in range(total)]
            random.Random(53).shuffle(names)
            base = 0
            for round_ in range(args.rounds):
                for server in contenders if round_ % 2 == 0 else contenders[::-1]:
                    batch, base = names[base:base + args.names], base + args.names
                    datafile = write_queries(tmp / f"{server.name}.txt", batch)
                    table.setdefault(server.name, []).append(
                        run_dnsperf(dnsperf, server, datafile, args.seconds, 10, None, True,
                                    False))
            sizes = {"tg-nftables": settled_size(("inet", "tiktokguard", "tiktok_v4")),
                     "dnsmasq-nft": settled_size(("inet", "peer", "tiktok_v4"))}
            head = (f"{'server':12} {'q/s':>9} {'lost':>6} {'avg ms':>7} {'cpu s/100k':>10} "
                    f"{'answered':>9} {'in set':>7}")
            print(head)
            print("-" * len(head))
            for server in contenders:
                results = table[server.name]
                answered = sum(r.noerror for r in results)  # with an address to learn
                size = sizes.get(server.name)
                print(f"{server.name:12} {statistics.median(r.qps for r in results):9.0f} "
                      f"{sum(r.lost for r in results):6d} "
                      f"{statistics.median(r.avg_ms for r in results):7.3f} "
                      f"{statistics.median(r.cpu_per_100k for r in results):10.2f} "
                      f"{answered:9d} {size if size is not None else '-':>7}")
            off, on = (statistics.median(r.qps for r in table[n])
                       for n in ("tg-off", "tg-nftables"))
            peer_off, peer_on = (statistics.median(r.qps for r in table[n])
                                 for n in ("dnsmasq", "dnsmasq-nft"))
            print(f"\nq/s with the sets / without: tiktokguard {on / off:.2f}, "
                  f"dnsmasq {peer_on / peer_off:.2f}")
            print(f"{args.rounds} rounds of {args.names} fresh names per server, alternating; "
                  "median q/s; lost and answered (NOERROR) summed.")
        finally:
            stop_all(servers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", type=int, default=30_000, help="fresh names per run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (all four servers each)")
    parser.add_argument("--seconds", type=float, default=20, help="limit of one dnsperf run")
    args = parser.parse_args()
    if os.environ.get(INSIDE):
        inside(args)
        return
    if os.geteuid() != 0 or shutil.which("ip") is None:
        sys.exit("bench: needs root and iproute2's ip (it works in its own network namespace)")
    namespace = f"tgbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        code = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, __file__,
                               *sys.argv[1:]], env=dict(os.environ, **{INSIDE: namespace})
                              ).returncode
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)
    sys.exit(code)


if __name__ == "__main__":
    main()
