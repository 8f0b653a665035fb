#!/usr/bin/env python3
"""Soak: minutes of every kind of traffic at once against the real daemon, with upstream
faults, on loopback only; bounded in time and in what it sends, and it stops what it starts.

    python3 bench/soak.py [--seconds 180]

Traffic (all concurrent):
  valid      10 well-behaved unmanaged clients (127.0.1.x), 20 q/s each, over UDP
  blocked    5 well-behaved managed clients (127.0.0.x), 10 q/s each, TikTok names
  tcp        2 well-behaved TCP clients, pipelining 10 queries at a time
  malformed  random bytes from 127.0.2.1, 100 packets/s
  flood      one client (127.0.3.1) at ~2 000 q/s, far over its rate limit (50 q/s)
  nonreader  4 TCP connections pipelining blocked queries and never reading
  trickler   20 TCP connections trickling a byte every 2 s, never a whole query
  api        /metrics, /healthz and device create/deactivate every second; 20 slow-header
             connections held open
Upstream faults: the first upstream stops answering for 6 s every 20 s; the second answers
SERVFAIL to everything for 3 s every 30 s.

Exits non-zero on any query from a well-behaved client left without an answer (an answer
includes SERVFAIL), a daemon that exits or logs a query the pipeline's catch-all had to answer,
or RSS growth over RSS_BOUND_MB from the end of the warm-up to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import dns.message  # noqa: E402

from tests.fakes import FakeUpstream, free_port  # noqa: E402

RSS_BOUND_MB = 64  # growth allowed after warm-up (cache bound in the config below: 32 MiB)
TOKEN = "soak-admin-token"
CLIENT_TIMEOUT = 5.0


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    lost: int = 0
    rcodes: dict[int | str, int] = field(default_factory=dict)
    note: str = ""


def query_wire(name: str, qid: int) -> bytes:
    message = dns.message.make_query(name, "A")
    message.id = qid
    return message.to_wire()


class UdpClient(asyncio.DatagramProtocol):
    """Sends queries from one source address and matches answers by ID."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.pending: dict[int, float] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 4:
            return
        qid = struct.unpack_from("!H", data)[0]
        if self.pending.pop(qid, None) is not None:
            self.tally.answered += 1
            code: int | str = "tc" if data[2] & 0x02 else data[3] & 0xF
            self.tally.rcodes[code] = self.tally.rcodes.get(code, 0) + 1

    def send(self, data: bytes, qid: int, port: int) -> None:
        assert self.transport is not None
        self.pending[qid] = time.monotonic()
        self.tally.sent += 1
        self.transport.sendto(data, ("127.0.0.1", port))

    def expire(self) -> None:
        now = time.monotonic()
        for qid in [q for q, at in self.pending.items() if now - at > CLIENT_TIMEOUT]:
            del self.pending[qid]
            self.tally.lost += 1


async def udp_client(source: str, tally: Tally) -> UdpClient:
    _, client = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: UdpClient(tally), local_addr=(source, 0))
    return client


async def well_behaved(source: str, names: list[str], rate: float, port: int, tally: Tally,
                       until: float) -> None:
    client = await udp_client(source, tally)
    rng = random.Random(source)
    try:
        while time.monotonic() < until:
            qid = rng.randrange(65536)
            while qid in client.pending:
                qid = rng.randrange(65536)
            client.send(query_wire(rng.choice(names), qid), qid, port)
            client.expire()
            await asyncio.sleep(1 / rate)
        deadline = time.monotonic() + CLIENT_TIMEOUT + 1
        while client.pending and time.monotonic() < deadline:  # noqa: ASYNC110 - a bounded grace
            await asyncio.sleep(0.1)
        client.tally.lost += len(client.pending)
        client.pending.clear()
    finally:
        assert client.transport is not None
        client.transport.close()


async def flooder(port: int, tally: Tally, until: float) -> None:
    client = await udp_client("127.0.3.1", tally)
    wire = query_wire("flood.a.test", 0)
    try:
        while time.monotonic() < until:
            for _ in range(20):
                qid = random.randrange(65536)
                client.send(struct.pack("!H", qid) + wire[2:], qid, port)
            await asyncio.sleep(0.01)
    finally:
        assert client.transport is not None
        client.transport.close()
    tally.note = "rate-limited: REFUSED / TC expected"


async def malformed(port: int, tally: Tally, until: float) -> None:
    client = await udp_client("127.0.2.1", tally)
    rng = random.Random(5)
    try:
        while time.monotonic() < until:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
            qid = struct.unpack_from("!H", data + b"\x00\x00")[0]
            client.send(data, qid, port)
            await asyncio.sleep(0.01)
    finally:
        assert client.transport is not None
        client.transport.close()
    tally.note = "FORMERR/NOTIMP or a counted drop"


def frame(name: str, qid: int) -> bytes:
    wire = query_wire(name, qid)
    return struct.pack("!H", len(wire)) + wire


async def tcp_client(port: int, tally: Tally, until: float, source: str) -> None:
    rng = random.Random(source)
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                           local_addr=(source, 0))
        except OSError:
            tally.lost += 1
            await asyncio.sleep(0.5)
            continue
        try:
            for _ in range(20):
                batch = [rng.randrange(65536) for _ in range(10)]
                writer.write(b"".join(frame(f"t{rng.randrange(500)}.a.test", q) for q in batch))
                tally.sent += len(batch)
                async with asyncio.timeout(CLIENT_TIMEOUT):
                    for _ in batch:
                        length = struct.unpack("!H", await reader.readexactly(2))[0]
                        await reader.readexactly(length)
                        tally.answered += 1
                await asyncio.sleep(0.05)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
    tally.lost = tally.sent - tally.answered


async def non_reader(port: int, tally: Tally, until: float, source: str) -> None:
    with contextlib.suppress(OSError):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                        local_addr=(source, 0))
        chunk = b"".join(frame("www.tiktok.com", i) for i in range(200))
        while time.monotonic() < until and tally.sent < 2_000_000:
            writer.write(chunk)
            tally.sent += 200
            try:
                async with asyncio.timeout(1):
                    await writer.drain()
            except TimeoutError:
                tally.note = "writes stalled: the daemon stopped reading (back-pressure)"
                await asyncio.sleep(1)
        writer.transport.abort()


async def trickler(port: int, tally: Tally, until: float, source: str) -> None:
    """A byte every 2 s, never fast enough to finish a query before the idle timer (5 s)
    closes the connection; one that got its whole query in would count as answered."""
    data = frame("a.test", 1)
    counts = tally.rcodes  # shared by the trickling tasks: connections, most bytes in one
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                           local_addr=(source, 0))
        except OSError:
            await asyncio.sleep(1)
            continue
        counts["connections"] = counts.get("connections", 0) + 1
        sent = 0
        try:
            for byte in data:
                if reader.at_eof() or time.monotonic() >= until:
                    break
                writer.write(bytes([byte]))
                sent += 1
                tally.sent += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        if await reader.read(1) == b"":
                            break  # closed by the server
            else:
                tally.answered += 1  # the whole query got in: the connection was kept
        except OSError:
            pass
        finally:
            counts["max_bytes"] = max(counts.get("max_bytes", 0), sent)
            writer.close()
    tally.note = "max_bytes: the most any connection got in before the server closed it"


async def api_traffic(http_port: int, tally: Tally, until: float) -> None:
    base = f"http://127.0.0.1:{http_port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    slow = []
    for _ in range(20):  # slow-header connections, held until the server closes them
        with contextlib.suppress(OSError):
            _r, w = await asyncio.open_connection("127.0.0.1", http_port)
            w.write(b"GET /healthz HTTP/1.1\r\nHost: soak\r\n")
            slow.append(w)
    i = 0
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while time.monotonic() < until:
            i += 1
            requests = [("GET", "/metrics", None), ("GET", "/healthz", None),
                        ("POST", "/api/v1/devices",
                         {"name": f"soak phone {i}", "addresses": [f"127.0.1.{200 + i % 40}"],
                          "custodian": "c", "supervisor": "s", "ticket": f"SR-{i}"})]
            for method, path, body in requests:
                tally.sent += 1
                try:
                    async with http.request(method, base + path, json=body,
                                            headers=headers) as response:
                        data = await response.read()
                        tally.answered += 1
                        tally.rcodes[response.status] = tally.rcodes.get(response.status, 0) + 1
                        if method == "POST" and response.status == 201:
                            device = json.loads(data)["id"]
                            tally.sent += 1
                            async with http.delete(f"{base}/api/v1/devices/{device}",
                                                   headers=headers) as gone:
                                await gone.read()
                                tally.answered += 1
                except (aiohttp.ClientError, TimeoutError):
                    tally.lost += 1
            await asyncio.sleep(1)
    for writer in slow:
        writer.close()


async def faults(first: FakeUpstream, second: FakeUpstream, until: float) -> None:
    start = time.monotonic()
    while time.monotonic() < until:
        elapsed = time.monotonic() - start
        first.silent = 10 <= elapsed % 20 < 16
        second.servfail_all = 20 <= elapsed % 30 < 23
        await asyncio.sleep(0.25)
    first.silent = second.servfail_all = False


def start_daemon(config: Path, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tiktokguard", "serve", "--config",
                             str(config), "--log-format", "json"], stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def catch_all_errors(log: Path) -> int:
    """Queries the pipeline's catch-all had to answer (each logged as query_failed)."""
    return sum(1 for line in log.read_text().splitlines() if '"query_failed"' in line)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--warmup", type=float, default=10)
    args = parser.parse_args()
    first = await FakeUpstream().start()
    second = await FakeUpstream().start()
    port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="tiktokguard-soak-") as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "tiktokguard.toml"
        config.write_text(f"""
[dns]
listen = ["127.0.0.1:{port}"]
upstreams = ["{first.address}", "{second.address}"]
upstream_timeout_ms = 500
allow_clients = ["127.0.0.0/8"]
rate_limit_qps = 50
cache_max_bytes = {32 * 1024 * 1024}
tcp_idle_timeout_ms = 5000
[policy]
managed_networks = ["127.0.0.0/24"]
[http]
listen = "127.0.0.1:{http_port}"
tokens.soak = {{ role = "admin", sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}" }}
[state]
dir = "{tmp / 'state'}"
""")
        log = (tmp / "daemon.log").open("w")
        proc = start_daemon(config, log)
        try:
            return await soak(args, proc, port, http_port, first, second, tmp / "daemon.log")
        finally:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            if proc.poll() is None:
                proc.kill()
            log.close()
            first.close()
            second.close()


async def soak(args: argparse.Namespace, proc: subprocess.Popen[bytes], port: int,
               http_port: int, first: FakeUpstream, second: FakeUpstream, log: Path) -> int:
    for _ in range(100):  # until it answers
        with contextlib.suppress(OSError, TimeoutError):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        await asyncio.sleep(0.2)
    tallies = {name: Tally() for name in ("valid", "blocked", "tcp", "malformed", "flood",
                                          "nonreader", "trickler", "api")}
    # Enough names that misses go on all along, so the upstream faults are felt.
    valid_names = [f"n{i}.a.test" for i in range(50_000)] + ["cname-ok.test", "nodata.test",
                                                           "missing.test", "big.test"]
    blocked_names = ["www.tiktok.com", "v16.tiktokcdn.com", "api.capcut.com", "douyin.com"]
    warm_until = time.monotonic() + args.warmup
    await asyncio.gather(*(well_behaved(f"127.0.1.{i}", valid_names, 20, port, Tally(),
                                        warm_until) for i in range(1, 11)))
    rss_start = rss_mb(proc.pid)
    until = time.monotonic() + args.seconds
    print(f"soak: {args.seconds:.0f} s on 127.0.0.1:{port}, daemon pid {proc.pid}, "
          f"RSS after warm-up {rss_start:.1f} MB", flush=True)
    await asyncio.gather(
        faults(first, second, until),
        *(well_behaved(f"127.0.1.{i}", valid_names, 20, port, tallies["valid"], until)
          for i in range(1, 11)),
        *(well_behaved(f"127.0.0.{i}", blocked_names, 10, port, tallies["blocked"], until)
          for i in range(10, 15)),
        *(tcp_client(port, tallies["tcp"], until, f"127.0.1.{100 + i}") for i in range(2)),
        malformed(port, tallies["malformed"], until),
        flooder(port, tallies["flood"], until),
        *(non_reader(port, tallies["nonreader"], until, f"127.0.4.{i}") for i in range(1, 5)),
        *(trickler(port, tallies["trickler"], until, f"127.0.5.{i}") for i in range(1, 21)),
        api_traffic(http_port, tallies["api"], until),
    )
    alive = proc.poll() is None
    rss_end = rss_mb(proc.pid) if alive else 0.0
    caught = catch_all_errors(log)
    print(f"{'class':10} {'sent':>9} {'answered':>9} {'lost':>6}  rcodes / status")
    for name, tally in tallies.items():
        codes = ", ".join(f"{k}:{v}" for k, v in sorted(tally.rcodes.items(), key=str))
        print(f"{name:10} {tally.sent:9} {tally.answered:9} {tally.lost:6}  {codes}"
              f"{'  (' + tally.note + ')' if tally.note else ''}")
    growth = rss_end - rss_start
    print(f"daemon alive: {alive}; catch-all errors logged: {caught}; "
          f"RSS {rss_start:.1f} -> {rss_end:.1f} MB (growth {growth:+.1f}, bound {RSS_BOUND_MB})")
    problems = []
    for name in ("valid", "blocked", "tcp", "api"):
        if tallies[name].lost:
            problems.append(f"{tallies[name].lost} {name} queries/requests unanswered")
    if tallies["trickler"].answered:
        problems.append("a trickling connection was kept open long enough to finish a query")
    if not alive:
        problems.append(f"the daemon exited ({proc.returncode})")
    if caught:
        problems.append(f"{caught} queries reached the pipeline's catch-all")
    if growth > RSS_BOUND_MB:
        problems.append(f"RSS grew {growth:.1f} MB (> {RSS_BOUND_MB})")
    print("FAIL: " + "; ".join(problems) if problems else "PASS")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
