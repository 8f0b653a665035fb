"""An in-process upstream DNS server for tests (UDP and TCP on loopback), built with dnslib.

Names it knows (under the zone `test.`):
  a.test / *.a.test   A 192.0.2.1 (TTL 300), AAAA 2001:db8::1
  cname-tiktok.test   CNAME edge.tiktokcdn.com., which has A 192.0.2.66
  cname-ok.test       CNAME a.test.
  big.test            40 TXT records (too big for 512-byte UDP)
  tc.test             UDP answers have TC set; TCP answers are complete
  servfail.test       SERVFAIL
  timeout.test        never answered
  spoof.test          first a reply with a wrong ID, then the right one
  nodata.test         NOERROR with no answer and a SOA (TTL 120, minimum 60)
  *.tiktokv.com       A 192.0.2.66 (TTL 30), AAAA 2001:db8::66 (TTL 1 000 000)
  alias.tiktokv.com   CNAME edge.cdnexample.net., which has A 198.51.100.7 (a shared CDN)
  *.dname-tiktok.test DNAME dname-tiktok.test → tiktok.com, the CNAME it makes, and an A
  validated.test      A 192.0.2.5, with AD when the query asks (AD or DO), as a validator does
  bogus.test          CD=1: A 192.0.2.99; CD=0: SERVFAIL with EDE 6 "DNSSEC Bogus"
  mx.test             MX with 20 targets, and their A records in the additional section
  huge*.test          TXT records of ~60 KB (over TCP; UDP answers have TC set)
  badname.test        CNAME whose target is a compression pointer forwards: unreadable
With hold=True, UDP replies wait until release(): queries stay in flight as long as a test wants.
anything else: NXDOMAIN with SOA (TTL 120, minimum 60).
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from dataclasses import dataclass, field

from dnslib import (
    AAAA,
    CNAME,
    EDNS0,
    MX,
    QTYPE,
    RCODE,
    RD,
    RR,
    RRSIG,
    SOA,
    TXT,
    A,
    DNSRecord,
    EDNSOption,
)

_next_port = 10_000 + random.randrange(20_000)  # where this run's search for ports goes on
_held: list[socket.socket] = []  # the ports handed out and not yet released (see free_port)


def free_port(host: str = "127.0.0.1") -> int:
    """A port for a test's server, free for both UDP and TCP, that cannot collide:
    - never handed out twice in a run (a counter, not a random draw);
    - held until the test ends (release_ports(), from an autouse fixture) by a bound TCP socket
      with SO_REUSEADDR that does not listen: the servers the tests start all bind with
      SO_REUSEADDR and take the port over it, while another run's probe (below) fails on it;
    - below the kernel's ephemeral range (32768-60999 on Linux), so no client socket, ours or
      the daemon's, is given it between this call and the bind."""
    global _next_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(2_000):
        port = _next_port
        _next_port = 10_000 + (_next_port - 10_000 + 1) % 20_000
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((host, port))
            tcp.bind((host, port))  # without SO_REUSEADDR: fails on another run's hold
            # Set after the bind, so the bind above was exclusive; from now on a server that
            # binds with SO_REUSEADDR may take the port over this socket (a later bind's check
            # reads the option as it is then).
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        except OSError:
            tcp.close()
            continue
        finally:
            udp.close()
        _held.append(tcp)
        return port
    raise RuntimeError("no free port in 10000-29999")


def release_ports() -> None:
    """End the holds on the ports handed out so far (their servers are bound by now)."""
    while _held:
        _held.pop().close()


@dataclass
class FakeUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    answer_a: str = "192.0.2.1"
    received: list[bytes] = field(default_factory=list)
    tcp_received: list[bytes] = field(default_factory=list)
    sources: list[tuple[str, int]] = field(default_factory=list)
    silent: bool = False  # answer nothing at all (a dead upstream)
    servfail_all: bool = False
    hold: bool = False  # keep UDP replies until release() (queries "in flight")
    held: list[tuple[bytes, tuple[str, int]]] = field(default_factory=list)
    held_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None

    def count(self, name: str) -> int:
        """How many queries for name (any type, any transport) arrived."""
        name = name.lower().rstrip(".") + "."
        n = 0
        for wire in self.received + self.tcp_received:
            if str(DNSRecord.parse(wire).q.qname).lower() == name:
                n += 1
        return n

    def answer(self, wire: bytes, tcp: bool) -> list[bytes]:
        query = DNSRecord.parse(wire)
        reply = query.reply()
        name = str(query.q.qname).lower().rstrip(".")
        qtype = query.q.qtype
        soa = RR("test.", QTYPE.SOA, ttl=120,
                 rdata=SOA("ns.test.", "root.test.", (1, 3600, 600, 86400, 60)))
        if self.servfail_all or name == "servfail.test":
            reply.header.rcode = RCODE.SERVFAIL
        elif name == "timeout.test":
            return []
        elif name == "a.test" or name.endswith(".a.test"):
            if qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=300, rdata=A(self.answer_a)))
            if qtype in (QTYPE.AAAA, QTYPE.ANY):
                reply.add_answer(RR(query.q.qname, QTYPE.AAAA, ttl=300,
                                    rdata=AAAA("2001:db8::1")))
            if not reply.rr:
                reply.add_auth(soa)
        elif name == "cname-tiktok.test":
            reply.add_answer(RR(query.q.qname, QTYPE.CNAME, ttl=300,
                                rdata=CNAME("edge.tiktokcdn.com.")))
            reply.add_answer(RR("edge.tiktokcdn.com.", QTYPE.A, ttl=60, rdata=A("192.0.2.66")))
        elif name == "cname-ok.test":
            reply.add_answer(RR(query.q.qname, QTYPE.CNAME, ttl=300, rdata=CNAME("a.test.")))
            reply.add_answer(RR("a.test.", QTYPE.A, ttl=300, rdata=A(self.answer_a)))
        elif name == "big.test":
            for i in range(40):
                reply.add_answer(RR(query.q.qname, QTYPE.TXT, ttl=300,
                                    rdata=TXT(f"record {i:02d} " + "x" * 20)))
        elif name == "tc.test":
            if tcp:
                reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=300, rdata=A("192.0.2.7")))
            else:
                reply.header.tc = 1
        elif name == "spoof.test":
            reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=300, rdata=A("192.0.2.9")))
            fake = DNSRecord.parse(reply.pack())
            fake.header.id = (query.header.id + 1) & 0xFFFF
            fake.rr[0].rdata = A("203.0.113.66")
            return [fake.pack(), reply.pack()]
        elif name.endswith(".dname-tiktok.test"):
            label = name.split(".")[0]
            reply.add_answer(RR("dname-tiktok.test.", 39, ttl=300,
                                rdata=RD(b"\x06tiktok\x03com\x00")))
            reply.add_answer(RR(query.q.qname, QTYPE.CNAME, ttl=300,
                                rdata=CNAME(f"{label}.tiktok.com.")))
            reply.add_answer(RR(f"{label}.tiktok.com.", QTYPE.A, ttl=60, rdata=A("192.0.2.66")))
        elif name == "validated.test":
            reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=300, rdata=A("192.0.2.5")))
            do = any(rr.rtype == QTYPE.OPT and rr.ttl & 0x8000 for rr in query.ar)
            reply.header.ad = int(bool(query.header.ad or do))
        elif name == "bogus.test":
            if query.header.cd:
                reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=300, rdata=A("192.0.2.99")))
            else:
                reply.header.rcode = RCODE.SERVFAIL
                reply.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(15, b"\x00\x06sig")]))
        elif name.startswith("huge") and name.endswith(".test"):
            if tcp:
                for i in range(240):
                    reply.add_answer(RR(query.q.qname, QTYPE.TXT, ttl=300,
                                        rdata=TXT(f"{i:03d}" + "h" * 240)))
            else:
                reply.header.tc = 1
        elif name == "badname.test":
            reply.add_answer(RR(query.q.qname, QTYPE.CNAME, ttl=300, rdata=RD(b"\xc0\xff")))
        elif name == "mx.test":
            for i in range(20):
                reply.add_answer(RR(query.q.qname, QTYPE.MX, ttl=300,
                                    rdata=MX(f"mail{i:02d}.mx.test.", 10 + i)))
            for i in range(20):
                reply.add_ar(RR(f"mail{i:02d}.mx.test.", QTYPE.A, ttl=300,
                                rdata=A(f"192.0.2.{100 + i}")))
        elif name == "alias.tiktokv.com":
            reply.add_answer(RR(query.q.qname, QTYPE.CNAME, ttl=300,
                                rdata=CNAME("edge.cdnexample.net.")))
            reply.add_answer(RR("edge.cdnexample.net.", QTYPE.A, ttl=300,
                                rdata=A("198.51.100.7")))
        elif name.endswith(".tiktokv.com"):
            if qtype == QTYPE.A:
                reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=30, rdata=A("192.0.2.66")))
            elif qtype == QTYPE.AAAA:
                reply.add_answer(RR(query.q.qname, QTYPE.AAAA, ttl=1_000_000,
                                    rdata=AAAA("2001:db8::66")))
            else:
                reply.add_auth(soa)
        elif name == "nodata.test":
            reply.add_auth(soa)
        elif name in ("longneg.test", "signed-longneg.test"):
            # A negative answer whose SOA asks to be kept for ever (seen in the wild).
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(RR("test.", QTYPE.SOA, ttl=86_400, rdata=SOA(
                "ns.test.", "root.test.", (1, 3600, 600, 86400, 2**31 - 1))))
            if name.startswith("signed"):
                reply.add_auth(RR("test.", QTYPE.RRSIG, ttl=86_400, rdata=RRSIG(
                    QTYPE.SOA, 13, 1, 86_400, 1_900_000_000, 1_800_000_000, 4242, "test.",
                    b"\x01" * 64)))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(soa)
        return [reply.pack()]

    async def start(self) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                upstream.received.append(data)
                upstream.sources.append(addr)
                if upstream.silent:
                    return
                for wire in upstream.answer(data, tcp=False):
                    if upstream.hold:
                        upstream.held.append((wire, addr))
                        upstream.held_changed.set()
                    else:
                        self.transport.sendto(wire, addr)  # type: ignore[attr-defined]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(length)
                    upstream.tcp_received.append(data)
                    if upstream.silent:
                        continue
                    for wire in upstream.answer(data, tcp=True):
                        writer.write(struct.pack("!H", len(wire)) + wire)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        if not self.port:
            self.port = free_port(self.host)
        self._udp, _ = await loop.create_datagram_endpoint(
            Udp, local_addr=(self.host, self.port))
        self._tcp = await asyncio.start_server(tcp, self.host, self.port)
        return self

    def release(self) -> None:
        """Send the held replies and stop holding."""
        self.hold = False
        assert self._udp is not None
        for wire, addr in self.held:
            self._udp.sendto(wire, addr)
        self.held.clear()

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


async def _serve_forever(host: str, port: int) -> None:
    fake = await FakeUpstream(host=host, port=port).start()
    print(f"ready {fake.address}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        fake.close()


if __name__ == "__main__":  # python -m tests.fakes HOST PORT: a stand-alone fake upstream
    import sys

    asyncio.run(_serve_forever(sys.argv[1], int(sys.argv[2])))
