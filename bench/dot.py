"""DNS over TLS: tiktokguard's DoT listener against unbound's, side by side, with dnsperf -m dot,
on loopback only.

An upstream (dnsmasq answering a generated zone) behind both; a certificate made with openssl for
the run; unbound forwarding to the upstream with its own TLS service (tls-service-key/-pem),
tiktokguard forwarding to it with its DoT listener. dnsperf sends cached names (warmed first)
over TLS from 10 connections, then blocked names to tiktokguard. Prints queries per second, the
average latency and CPU seconds per 100k queries, and the ratio tiktokguard/unbound.

Needs dnsperf, dnsmasq, unbound and openssl (Debian: apt-get install dnsperf dnsmasq-base unbound
openssl). Sends traffic only to 127.0.0.1; every process it starts is stopped at the end.

    python3 bench/dot.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # (bench/run.py's helpers)
    LOCAL,
    Result,
    Server,
    free_port,
    need,
    run_dnsperf,
    start_tiktokguard,
    start_upstream,
    stop_all,
    write_queries,
)


def wait_for_port(port: int, seconds: float = 20) -> None:
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((LOCAL, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {LOCAL}:{port}")


def certificate(folder: Path) -> tuple[Path, Path]:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", "key.pem", "-out", "cert.pem",
                    "-days", "1", "-subj", "/CN=dns.bench", "-addext",
                    "subjectAltName=DNS:dns.bench,IP:127.0.0.1"], cwd=folder, check=True,
                   capture_output=True)
    return folder / "cert.pem", folder / "key.pem"


def start_unbound(unbound: str, folder: Path, upstream: Server, cert: Path, key: Path
                  ) -> Server:
    port = free_port()
    conf = folder / "unbound.conf"
    conf.write_text(f"""server:
    interface: {LOCAL}@{port}
    tls-port: {port}
    tls-service-key: "{key}"
    tls-service-pem: "{cert}"
    do-ip6: no
    username: ""
    chroot: ""
    directory: "{folder}"
    pidfile: "{folder}/unbound.pid"
    use-syslog: no
    logfile: "{folder}/unbound.log"
    num-threads: 1
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    incoming-num-tcp: 100
    msg-cache-size: 64m
    rrset-cache-size: 64m
forward-zone:
    name: "."
    forward-addr: {LOCAL}@{upstream.port}
""")
    proc = subprocess.Popen([unbound, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return Server("unbound", port, proc, [proc.pid])


def dot(dnsperf: str, server: Server, datafile: Path, seconds: float) -> Result:
    """One dnsperf run over TLS from 10 connections."""
    return run_dnsperf(dnsperf, server, datafile, seconds, 10, None, False, False, mode="dot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8, help="length of one dnsperf run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server (median shown)")
    args = parser.parse_args()
    dnsperf = need("dnsperf", "dnsperf")
    dnsmasq = need("dnsmasq", "dnsmasq-base")
    unbound = need("unbound", "unbound")
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="tg-dot-bench-") as tmp:
        folder = Path(tmp)
        try:
            names = [f"h{i}.bench.test" for i in range(2000)]
            hosts = folder / "hosts"
            hosts.write_text("".join(f"192.0.2.{i % 250 + 1} {n}\n"
                                     for i, n in enumerate(names)))
            upstream = start_upstream(dnsmasq, hosts, "bench.test")
            servers.append(upstream)
            cert, key = certificate(folder)
            peer = start_unbound(unbound, folder, upstream, cert, key)
            servers.append(peer)
            port, tls_port = free_port(), free_port()
            config = folder / "tg.toml"
            config.write_text(f"""[dns]
listen = ["{LOCAL}:{port}"]
tls_listen = ["{LOCAL}:{tls_port}"]
tls_certificate = "{cert}"
tls_private_key = "{key}"
tls_name = "dns.bench"
upstreams = ["{LOCAL}:{upstream.port}"]
allow_clients = ["127.0.0.0/8"]
max_tcp_per_client = 1000
[policy]
managed_networks = ["127.0.0.0/8"]
[http]
listen = ""
[state]
dir = "{folder / 'state'}"
""")
            tg = start_tiktokguard("tiktokguard", tls_port, config)
            servers.append(tg)
            wait_for_port(tls_port)
            cached = write_queries(folder / "cached.txt", names)
            blocked = write_queries(folder / "blocked.txt",
                                    [f"n{i}.tiktok.com" for i in range(2000)])
            results: dict[tuple[str, str], list[Result]] = {}
            for server in (peer, tg):
                run_dnsperf(dnsperf, Server(server.name, port if server is tg else peer.port,
                                            server.proc, server.pids),
                            cached, 10, 1, None, True, False)  # warm the caches over UDP
            for _round in range(args.rounds):
                for server in (peer, tg):
                    results.setdefault((server.name, "cached"), []).append(
                        dot(dnsperf, server, cached, args.seconds))
                results.setdefault(("tiktokguard", "blocked"), []).append(
                    dot(dnsperf, tg, blocked, args.seconds))
        finally:
            stop_all(servers)
    print(f"DNS over TLS, dnsperf -m dot -c 10, {args.seconds:g} s per run, median of "
          f"{args.rounds}")
    print(f"{'workload':9} {'server':12} {'q/s':>9} {'avg ms':>8} {'lost':>6} {'cpu s/100k':>11}")
    medians = {}
    for (name, workload), runs in results.items():
        qps = statistics.median(r.qps for r in runs)
        medians[name, workload] = qps
        middle = sorted(runs, key=lambda r: r.qps)[len(runs) // 2]
        print(f"{workload:9} {name:12} {qps:9.0f} {middle.avg_ms:8.2f} {middle.lost:6d} "
              f"{middle.cpu_per_100k:11.2f}")
    ratio = medians["tiktokguard", "cached"] / medians["unbound", "cached"]
    print(f"cached    ratio        {ratio:9.2f}  (tiktokguard / unbound, median q/s)")


if __name__ == "__main__":
    main()
