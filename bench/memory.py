#!/usr/bin/env python3
"""Memory and list-load time of the real daemon with a 100 000-rule list and a full cache.

Generates a 100 000-rule list (the bundled list plus generated names), measures how long the
daemon takes to load it (in-process, three runs), then starts the daemon on it with
cache_size = 100000 in front of a dnsmasq upstream, fills the cache with 100 000 distinct names
(dnsperf, loopback), and reports the process's peak RSS.

    python3 bench/memory.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import LOCAL, ZONE_NAMES, free_port, need, proc_rss_peak_mb, wait_for_dns

RULES = 100_000
CACHED = 100_000


def main() -> None:
    dnsperf = need("dnsperf", "dnsperf")
    dnsmasq = need("dnsmasq", "dnsmasq-base")
    from tiktokguard.config import BUNDLED_LISTS
    from tiktokguard.policy.domains import load_lists

    with tempfile.TemporaryDirectory(prefix="tiktokguard-mem-") as tmp_name:
        tmp = Path(tmp_name)
        big = tmp / "big.txt"
        bundled = (BUNDLED_LISTS / "tiktok-bytedance.txt").read_text()
        generated = "".join(f"ads{i}.tracker{i % 977}.example\n"
                            for i in range(RULES - len(load_lists([BUNDLED_LISTS /
                                                                   "tiktok-bytedance.txt"]))))
        big.write_text(bundled + generated)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            matcher = load_lists([big])
            times.append(time.perf_counter() - started)
        print(f"list load: {len(matcher)} rules in {statistics.median(times):.2f} s "
              f"(median of 3, {min(times):.2f}-{max(times):.2f})")

        hosts = tmp / "zone.hosts"
        hosts.write_text("".join(f"198.18.{i // 250 % 250}.{i % 250 + 1} n{i}.bench.test\n"
                                 for i in range(ZONE_NAMES)))
        up_port, tg_port = free_port(), free_port()
        upstream = subprocess.Popen(
            [dnsmasq, "--keep-in-foreground", "--no-resolv", "--no-hosts",
             f"--addn-hosts={hosts}", "--local-ttl=3600", f"--port={up_port}",
             "--local=/bench.test/", f"--listen-address={LOCAL}", "--bind-interfaces",
             "--cache-size=0", "--user=root" if os.geteuid() == 0 else "--user=nobody",
             "--pid-file=", "--log-facility=/dev/null"], stderr=subprocess.DEVNULL)
        config = tmp / "tg.toml"
        config.write_text(f"""
[dns]
listen = ["{LOCAL}:{tg_port}"]
upstreams = ["{LOCAL}:{up_port}"]
cache_size = {CACHED}
[policy]
blocklists = ["{big}"]
[http]
listen = ""
[state]
dir = "{tmp / 'state'}"
""")
        tg = subprocess.Popen([sys.executable, "-m", "tiktokguard", "serve", "--config",
                               str(config)], cwd=tmp, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
        try:
            wait_for_dns(up_port)
            wait_for_dns(tg_port)
            rss_idle = proc_rss_peak_mb(tg.pid)
            names = tmp / "names.txt"
            names.write_text("".join(f"n{i}.bench.test A\n" for i in range(CACHED)))
            out = subprocess.run([dnsperf, "-s", LOCAL, "-p", str(tg_port), "-d", str(names),
                                  "-n", "1", "-c", "4", "-q", "200", "-t", "5"],
                                 capture_output=True, text=True, timeout=300).stdout
            completed = [line for line in out.splitlines() if "Queries completed" in line]
            print(f"cache fill: {completed[0].strip() if completed else out[-300:]}")
            print(f"peak RSS: {rss_idle:.1f} MB with the {len(matcher)}-rule list loaded, "
                  f"{proc_rss_peak_mb(tg.pid):.1f} MB with {CACHED} cached answers too")
        finally:
            for proc in (tg, upstream):
                proc.terminate()
                proc.wait(timeout=10)


if __name__ == "__main__":
    main()
