#!/usr/bin/env python3
"""tiktokguard against dnsmasq, side by side, with dnsperf, on loopback only.

Starts an upstream (dnsmasq serving a generated zone), tiktokguard forwarding to it, and a dnsmasq
peer forwarding to it and blocking the same list; generates query files; runs dnsperf against each
server in turn, alternating A B A B for several rounds; prints q/s, lost queries, latency, server
CPU seconds per 100k queries and peak RSS, and the ratio tiktokguard/dnsmasq per workload.

    python3 bench/run.py                      # all workloads, ~3 minutes
    python3 bench/run.py --seconds 5 --rounds 1 --workloads mix

Needs dnsperf and dnsmasq (Debian: apt-get install dnsperf dnsmasq-base). Sends traffic only to
127.0.0.1, bounded by --seconds per run; every process it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ZONE_NAMES = 200_000  # names the upstream knows: n<i>.bench.test
HOT_NAMES = 2_000  # the names the "mix" workload repeats (cache hits after warm-up)
LOCAL = "127.0.0.1"


def need(tool: str, package: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists()
                                  else None)
    if path is None:
        sys.exit(f"bench: {tool} not found; install it with: apt-get install {package}")
    return path


def free_port() -> int:
    for _ in range(200):
        port = random.randint(20_000, 30_000)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                u.bind((LOCAL, port))
                t.bind((LOCAL, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def wait_for_dns(port: int, seconds: float = 20) -> None:
    """Until the server answers a query on port (a started process is not yet a ready one)."""
    query = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             b"\x02n0\x05bench\x04test\x00\x00\x01\x00\x01")
    deadline = time.monotonic() + seconds
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            sock.sendto(query, (LOCAL, port))
            try:
                sock.recv(4096)
                return
            except OSError:
                continue
    raise RuntimeError(f"nothing answers on port {port}")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children so far."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields_[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    pids: list[int] = field(default_factory=list)

    def cpu(self) -> float:
        return sum(proc_cpu(pid) for pid in self.pids)

    def rss(self) -> float:
        return sum(proc_rss_peak_mb(pid) for pid in self.pids)


@dataclass
class Result:
    qps: float
    lost: int
    sent: int
    avg_ms: float
    p99_ms: float | None
    cpu_per_100k: float
    noerror: int = 0  # answers with RCODE NOERROR


def run_dnsperf(dnsperf: str, server: Server, datafile: Path, seconds: float, clients: int,
                max_qps: int | None, once: bool, latencies: bool, mode: str = "udp") -> Result:
    cmd = [dnsperf, "-s", LOCAL, "-p", str(server.port), "-d", str(datafile), "-l", str(seconds),
           "-c", str(clients), "-q", "500", "-t", "2", "-m", mode]
    if max_qps:
        cmd += ["-Q", str(max_qps)]
    if once:
        cmd += ["-n", "1"]
    if latencies:
        cmd += ["-v"]
    before = server.cpu()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    cpu = server.cpu() - before
    sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    completed = int(re.search(r"Queries completed:\s+(\d+)", out).group(1))  # type: ignore
    lost = int(re.search(r"Queries lost:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))  # type: ignore
    avg = float(re.search(r"Average Latency \(s\):\s+([\d.]+)", out).group(1))  # type: ignore
    p99 = None
    if latencies:
        samples = sorted(float(m) for m in re.findall(r"^> \S+ .* ([\d.]+)$", out, re.M))
        if samples:
            p99 = samples[int(len(samples) * 0.99) - 1] * 1000
    noerror = re.search(r"NOERROR (\d+)", out)
    return Result(qps, lost, sent, avg * 1000, p99, cpu / max(completed, 1) * 100_000,
                  int(noerror.group(1)) if noerror else 0)


def write_queries(path: Path, names: list[str]) -> Path:
    path.write_text("".join(f"{n} A\n" for n in names))
    return path


def _dnsmasq_common() -> list[str]:
    return ["--keep-in-foreground", "--no-resolv", "--no-hosts", f"--listen-address={LOCAL}",
            "--bind-interfaces", "--user=root" if os.geteuid() == 0 else "--user=nobody",
            "--pid-file=", "--log-facility=/dev/null"]


def start_upstream(dnsmasq: str, hosts: Path, zone: str) -> Server:
    """dnsmasq answering `zone` from a hosts file (TTL 3600), forwarding nowhere."""
    port = free_port()
    proc = subprocess.Popen(
        [dnsmasq, *_dnsmasq_common(), f"--addn-hosts={hosts}", "--local-ttl=3600",
         f"--port={port}", f"--local=/{zone}/", "--cache-size=0"], stderr=subprocess.DEVNULL)
    wait_for_dns(port)
    return Server("upstream", port, proc, [proc.pid])


def start_dnsmasq(dnsmasq: str, name: str, upstream: Server, *extra: str) -> Server:
    """A dnsmasq peer forwarding to the upstream, with a 10 000-entry cache."""
    port = free_port()
    proc = subprocess.Popen(
        [dnsmasq, *_dnsmasq_common(), f"--server={LOCAL}#{upstream.port}",
         "--cache-size=10000", f"--port={port}", "--dns-forward-max=1000", *extra],
        stderr=subprocess.DEVNULL)
    return Server(name, port, proc, [proc.pid])


def start_tiktokguard(name: str, port: int, config: Path) -> Server:
    """The real daemon (`python -m tiktokguard serve`) with this config, JSON logs discarded."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiktokguard", "serve", "--config", str(config),
         "--log-format", "json"], cwd=config.parent, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return Server(name, port, proc, [proc.pid])


def stop_all(servers: list[Server]) -> None:
    for server in servers:
        for pid in [server.proc.pid, *child_pids(server.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8, help="length of one dnsperf run")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per workload")
    parser.add_argument("--workers", type=int, default=1, help="tiktokguard [dns] workers")
    parser.add_argument("--workloads", default="mix,blocked,cold,latency",
                        help="comma-separated: mix, blocked, cold, latency")
    args = parser.parse_args()
    dnsperf = need("dnsperf", "dnsperf")
    dnsmasq = need("dnsmasq", "dnsmasq-base")
    workloads = args.workloads.split(",")

    from tiktokguard.config import BUNDLED_LISTS
    from tiktokguard.policy.domains import load_lists

    rules = sorted(load_lists([BUNDLED_LISTS / "tiktok-bytedance.txt"]).rules.values())
    rng = random.Random(53)
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="tiktokguard-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            # -- upstream: dnsmasq answering a generated zone, never forwarding anywhere
            hosts = tmp / "zone.hosts"
            hosts.write_text("".join(f"198.18.{i // 250}.{i % 250 + 1} n{i}.bench.test\n"
                                     for i in range(ZONE_NAMES)))
            upstream = start_upstream(dnsmasq, hosts, "bench.test")
            servers.append(upstream)

            # -- the dnsmasq peer: forwards to the upstream, blocks the same list
            peer_conf = tmp / "peer.conf"
            peer_conf.write_text("".join(f"local=/{rule}/\n" for rule in rules))
            peer = start_dnsmasq(dnsmasq, "dnsmasq", upstream, f"--conf-file={peer_conf}")
            servers.append(peer)

            # -- tiktokguard: the real daemon, metrics, incidents and devices all on
            tg_port, http_port = free_port(), free_port()
            config = tmp / "tiktokguard.toml"
            config.write_text(f"""
[dns]
listen = ["{LOCAL}:{tg_port}"]
upstreams = ["{LOCAL}:{upstream.port}"]
cache_size = 200000
{f"workers = {args.workers}" if args.workers != 1 else ""}
[http]
listen = "{LOCAL}:{http_port}"
[state]
dir = "{tmp / 'state'}"
""")
            tg = start_tiktokguard("tiktokguard", tg_port, config)
            servers.append(tg)
            wait_for_dns(peer.port)
            wait_for_dns(tg_port)
            time.sleep(0.5)  # let worker processes (if any) bind too
            tg.pids = [tg.proc.pid, *child_pids(tg.proc.pid)]

            hot = [f"n{i}.bench.test" for i in range(HOT_NAMES)]
            prefixes = ["www", "v16", "api", "m", "p16"]
            blocked_names = [f"{rng.choice(prefixes)}{i}.{rng.choice(rules)}"
                             for i in range(5_000)]
            mix = [rng.choice(blocked_names) if rng.random() < 0.1 else rng.choice(hot)
                   for _ in range(50_000)]
            files = {
                "mix": write_queries(tmp / "mix.txt", mix),
                "blocked": write_queries(tmp / "blocked.txt", blocked_names),
                "latency": write_queries(tmp / "latency.txt", mix),
            }
            warm = write_queries(tmp / "warm.txt", hot)
            contenders = [s for s in servers if s.name != "upstream"]
            for server in contenders:  # warm both caches with the hot names
                run_dnsperf(dnsperf, server, warm, 10, 1, None, True, False)

            table: dict[tuple[str, str], list[Result]] = {}
            cold_base = HOT_NAMES  # cold runs take fresh zone names, never used before
            for workload in workloads:
                for round_ in range(args.rounds):
                    order = contenders if round_ % 2 == 0 else contenders[::-1]
                    for server in order:
                        if workload == "cold":
                            # Every name new to both: each run its own fresh zone names.
                            names = [f"n{i}.bench.test" for i in
                                     range(cold_base, cold_base + 40_000)]
                            cold_base += 40_000
                            rng.shuffle(names)
                            datafile = write_queries(tmp / f"cold-{server.name}.txt", names)
                            result = run_dnsperf(dnsperf, server, datafile, args.seconds, 10,
                                                 None, True, False)
                        elif workload == "latency":
                            result = run_dnsperf(dnsperf, server, files["latency"],
                                                 args.seconds, 10, 5000, False, True)
                        else:
                            result = run_dnsperf(dnsperf, server, files[workload],
                                                 args.seconds, 10, None, False, False)
                        table.setdefault((workload, server.name), []).append(result)
            print_table(table, workloads, contenders)
        finally:
            stop_all(servers)


def child_pids(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(p) for p in out.split()]


def print_table(table: dict[tuple[str, str], list[Result]], workloads: list[str],
                servers: list[Server]) -> None:
    rss = {s.name: s.rss() for s in servers}
    head = (f"{'workload':9} {'server':12} {'q/s':>9} {'lost':>6} {'avg ms':>7} {'p99 ms':>7} "
            f"{'cpu s/100k':>10} {'peak MB':>8}")
    print(head)
    print("-" * len(head))
    for workload in workloads:
        medians = {}
        for server in servers:
            results = table[workload, server.name]
            qps = statistics.median(r.qps for r in results)
            medians[server.name] = qps
            p99s = [r.p99_ms for r in results if r.p99_ms is not None]
            p99 = f"{statistics.median(p99s):7.3f}" if p99s else f"{'-':>7}"
            print(f"{workload:9} {server.name:12} {qps:9.0f} {sum(r.lost for r in results):6d} "
                  f"{statistics.median(r.avg_ms for r in results):7.3f} {p99} "
                  f"{statistics.median(r.cpu_per_100k for r in results):10.2f} "
                  f"{rss[server.name]:8.1f}")
        if medians.get("dnsmasq"):
            print(f"{workload:9} {'ratio':12} {medians['tiktokguard'] / medians['dnsmasq']:9.2f}"
                  "  (tiktokguard / dnsmasq, median q/s)")
    print(f"\n{len(table[workloads[0], servers[0].name])} rounds per cell, alternating; "
          "median q/s and latency; lost summed over the rounds.")


if __name__ == "__main__":
    main()
