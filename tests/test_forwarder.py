"""The forwarder's stance (docs/design.md §5), one regression test per defect found by the
differential evaluation (issue 11, items 1-9), over real sockets against the in-process fake
upstream."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from structlog.testing import capture_logs

from tests.conftest import MANAGED, UNMANAGED, Running, ede_codes, queries
from tests.fakes import FakeUpstream
from tiktokguard.dns.server import UdpProtocol
from tiktokguard.policy.clients import client_address


async def query(tg: Running, name: str, rdtype: str = "A", source: str = UNMANAGED,
                flags: int = dns.flags.RD, do: bool = False, edns: bool = True,
                payload: int = 1232, rdclass: str = "IN", tcp: bool = False
                ) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, rdclass, use_edns=0 if edns else False,
                               payload=payload, want_dnssec=do)
    q.flags = flags
    if tcp:
        return await dns.asyncquery.tcp(q, "127.0.0.1", port=tg.port, source=source, timeout=3)
    return await dns.asyncquery.udp(q, "127.0.0.1", port=tg.port, source=source, timeout=3)


# -- 1. DNAME ------------------------------------------------------------------------------------

async def test_dname_into_a_blocked_zone_is_blocked_for_managed_clients(
        tg: Running, upstream: FakeUpstream) -> None:
    reply = await query(tg, "www.dname-tiktok.test", source=MANAGED)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert dns.edns.EDECode.BLOCKED in ede_codes(reply)
    assert queries(tg, "blocked") == 1
    assert tg.metrics.sample("tiktokguard_dns_blocked_total", rule="tiktok.com") == 1
    incidents = tg.daemon.incidents
    assert incidents is not None and any(key[1] == "tiktok.com" for key in incidents.open)


async def test_dname_is_passed_through_intact_to_other_clients(tg: Running) -> None:
    reply = await query(tg, "www.dname-tiktok.test", source=UNMANAGED)
    assert reply.rcode() == dns.rcode.NOERROR
    assert [rrset.rdtype for rrset in reply.answer] == [
        dns.rdatatype.DNAME, dns.rdatatype.CNAME, dns.rdatatype.A]
    assert reply.answer[0][0].target.to_text() == "tiktok.com."
    # The decision tells the truth: an unmanaged client that reached a listed name.
    assert queries(tg, "unmanaged") == 1


# -- 2, 4, 5. CD, AD and DNSSEC failures ----------------------------------------------------------

async def test_cd_answers_are_never_served_to_cd0_clients(tg: Running,
                                                          upstream: FakeUpstream) -> None:
    checking_disabled = await query(tg, "bogus.test", flags=dns.flags.RD | dns.flags.CD)
    assert checking_disabled.rcode() == dns.rcode.NOERROR
    assert checking_disabled.flags & dns.flags.CD
    validated = await query(tg, "bogus.test")
    # RFC 4035 §3.2.2: the bogus data is not given to a client that did not set CD, and the
    # upstream's own verdict (EDE 6 "DNSSEC Bogus") reaches it unchanged.
    assert validated.rcode() == dns.rcode.SERVFAIL
    assert not validated.answer
    assert not validated.flags & dns.flags.CD
    assert ede_codes(validated) == [dns.edns.EDECode.DNSSEC_BOGUS]
    assert upstream.count("bogus.test") == 2
    # From the cache, each kind of client still gets its own.
    again = await query(tg, "bogus.test", flags=dns.flags.RD | dns.flags.CD)
    assert again.rcode() == dns.rcode.NOERROR and again.flags & dns.flags.CD
    assert (await query(tg, "bogus.test")).rcode() == dns.rcode.SERVFAIL
    assert upstream.count("bogus.test") == 2


async def test_dnssec_failure_is_not_held_against_the_upstream(tg: Running) -> None:
    for i in range(5):
        await query(tg, "bogus.test", edns=bool(i % 2))
        tg.daemon.cache.clear()
    upstream_state = tg.daemon.pool.upstreams[0]
    assert upstream_state.failures == 0 and upstream_state.down_until == 0
    assert tg.daemon.readiness_problems() == []


async def test_ad_comes_from_the_upstream_and_the_asking_client(tg: Running) -> None:
    # The first client neither asks for AD nor for DNSSEC: its answer has no AD ...
    first = await query(tg, "validated.test")
    assert not first.flags & dns.flags.AD
    # ... and a later client that asks, by AD or by DO, still learns the data is authentic
    # (RFC 6840 §5.7-5.8), from the same cache entry.
    by_ad = await query(tg, "validated.test", flags=dns.flags.RD | dns.flags.AD)
    by_do = await query(tg, "validated.test", do=True)
    assert by_ad.flags & dns.flags.AD and by_do.flags & dns.flags.AD
    assert tg.metrics.sample("tiktokguard_cache_hits_total") == 1  # (DO is in the cache key)
    # RD is the query's own in every answer.
    assert all(r.flags & dns.flags.RD for r in (first, by_ad, by_do))


# -- 3. RD=0 -------------------------------------------------------------------------------------

async def test_rd0_is_refused_and_leaves_nothing_behind(tg: Running,
                                                        upstream: FakeUpstream) -> None:
    for _ in range(3):
        reply = await query(tg, "a.test", flags=0)
        assert reply.rcode() == dns.rcode.REFUSED
        assert not reply.flags & dns.flags.RD
        assert ede_codes(reply) == [dns.edns.EDECode.NOT_AUTHORITATIVE]
        assert len(reply.question) == 1
    assert upstream.count("a.test") == 0  # no cache snooping, no upstream query
    reply = await query(tg, "a.test")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer
    assert tg.daemon.pool.upstreams[0].last_failure == 0
    assert tg.daemon.readiness_problems() == []
    assert queries(tg, "refused") == 3


# -- 6. RFC 2181 §9 ------------------------------------------------------------------------------

async def test_additional_records_are_dropped_before_tc(tg: Running) -> None:
    full = await query(tg, "mx.test", "MX", tcp=True)
    assert len(full.answer[0]) == 20 and len(full.additional) == 20
    small = await query(tg, "mx.test", "MX", payload=512)
    assert not small.flags & dns.flags.TC
    assert len(small.answer[0]) == 20  # the answer whole ...
    assert 0 < len(small.additional) < 20  # ... and of the additional records what fits
    assert len(small.to_wire()) <= 512
    tiny = await query(tg, "big.test", "TXT", payload=512)
    assert tiny.flags & dns.flags.TC  # the answer section itself does not fit: TC


# -- 7. error answers and what is not forwarded --------------------------------------------------

async def test_formerr_keeps_the_opt(tg: Running) -> None:
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
    question = b"\x01a\x04test\x00\x00\x01\x00\x01"
    data = struct.pack("!HHHHHH", 0x4321, 0x0100, 2, 0, 0, 1) + question * 2 + opt
    reply = await raw_udp(tg, data)
    rid, flags, qdcount, _an, _ns, arcount = struct.unpack_from("!HHHHHH", reply)
    assert rid == 0x4321 and flags & 0xF == dns.rcode.FORMERR
    assert arcount == 1 and reply.endswith(b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00")
    assert qdcount == 0  # two questions: neither can be the one echoed


@pytest.mark.parametrize(("name", "rdtype", "rdclass"), [
    ("version.bind", "TXT", "CH"), ("a.test", "A", "HS"), ("test", "AXFR", "IN"),
    ("test", "IXFR", "IN")])
async def test_not_forwarded_but_refused(tg: Running, upstream: FakeUpstream, name: str,
                                         rdtype: str, rdclass: str) -> None:
    reply = await query(tg, name, rdtype, rdclass=rdclass, tcp=rdtype != "A")
    assert reply.rcode() == dns.rcode.REFUSED
    assert reply.question[0].rdclass == dns.rdataclass.from_text(rdclass)
    assert reply.edns == 0
    assert not upstream.received and not upstream.tcp_received


# -- 8. nothing unexpected goes unanswered -------------------------------------------------------

async def test_a_failing_stage_answers_servfail_and_is_counted(
        tg: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*_args: Any) -> Any:
        raise RuntimeError("a bug on the cache-miss path")

    monkeypatch.setattr(tg.daemon.pool, "resolve", broken)
    with capture_logs() as logs:
        for name in ("a.test", "b.a.test"):
            reply = await query(tg, name)
            assert reply.rcode() == dns.rcode.SERVFAIL
    assert queries(tg, "error") == 2
    failures = [line for line in logs if line.get("event") == "query_failed"]
    assert len(failures) == 1  # one cause, logged once
    assert "a bug on the cache-miss path" in failures[0]["error"]
    assert "Traceback" in failures[0]["traceback"]


async def test_a_failing_synchronous_stage_answers_servfail(
        tg: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any) -> Any:
        raise KeyError("decide")

    monkeypatch.setattr(tg.daemon.engine, "decide", broken)
    reply = await query(tg, "a.test", source=MANAGED, tcp=True)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert queries(tg, "error", "tcp") == 1


# -- 9. one spelling of a client's address -------------------------------------------------------

def test_client_address_strips_scope_and_maps_ipv4() -> None:
    assert client_address("fe80::20%eth0") == "fe80::20"
    assert client_address("::ffff:127.0.0.5") == "127.0.0.5"
    assert client_address("::FFFF:10.1.2.3") == "10.1.2.3"
    assert client_address("2001:db8::1") == "2001:db8::1"
    assert client_address("127.0.0.1") == "127.0.0.1"


async def test_a_scoped_link_local_client_is_the_registered_device(
        tmp_path: Any, upstream: FakeUpstream) -> None:
    from tests.conftest import running_daemon

    extra = '[dns]\nallow_clients = ["127.0.0.0/8", "fe80::/10"]\n' \
            '[policy]\nmanaged_networks = ["127.0.0.0/24", "fe80::/10"]'
    async with running_daemon(tmp_path, [upstream.address], extra=extra) as tg:
        await tg.add_device(addresses=["fe80::20"])
        sent: list[bytes] = []
        v6_socket = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)

        class Transport:
            def sendto(self, data: bytes, addr: Any) -> None:
                sent.append(data)

            def is_closing(self) -> bool:
                return False

            def get_extra_info(self, name: str) -> Any:
                return v6_socket if name == "socket" else None

        with v6_socket:
            protocol = UdpProtocol(tg.daemon.server)
            protocol.connection_made(Transport())  # type: ignore[arg-type]
        wire = dns.message.make_query("www.tiktokv.com", "A", use_edns=0).to_wire()
        # What the kernel reports for a link-local source: the address with its scope.
        protocol.datagram_received(wire, ("fe80::20%eth0", 5353, 0, 2))
        await asyncio.wait_for(asyncio.gather(*tg.daemon.server.tasks), 3)
        reply = dns.message.from_wire(sent[0])
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer  # exempt, not blocked
        assert queries(tg, "allowlisted") == 1
        protocol.datagram_received(wire, ("fe80::21%eth0", 5353, 0, 2))
        blocked = dns.message.from_wire(sent[1])
        assert blocked.rcode() == dns.rcode.NXDOMAIN
        assert dns.edns.EDECode.BLOCKED in ede_codes(blocked)


async def raw_udp(tg: Running, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.bind((UNMANAGED, 0))
        await loop.sock_sendto(sock, data, ("127.0.0.1", tg.port))
        async with asyncio.timeout(2):
            return await loop.sock_recv(sock, 65535)


# -- Negative TTLs (RFC 2308 §5) ------------------------------------------------------------------

def _soa(reply: dns.message.Message) -> tuple[int, int]:
    (rrset,) = [r for r in reply.authority if r.rdtype == dns.rdatatype.SOA]
    return rrset.ttl, rrset[0].minimum


async def test_negative_ttls_are_capped_for_clients(tg: Running) -> None:
    """The upstream's SOA says TTL 86 400 and MINIMUM 2**31 - 1: clients see
    dns.max_negative_ttl (3 600) for both, from the upstream and from the cache alike."""
    for _ in range(2):
        reply = await query(tg, "longneg.test")
        assert reply.rcode() == dns.rcode.NXDOMAIN
        ttl, minimum = _soa(reply)
        assert ttl <= 3600 and ttl >= 3590 and minimum == 3600
    assert tg.metrics.sample("tiktokguard_cache_hits_total") == 1


async def test_a_signed_soa_keeps_its_minimum_and_only_its_ttl_is_capped(
        tmp_path: Any, upstream: FakeUpstream) -> None:
    """MINIMUM is signed data (a validating stub would call a rewritten one bogus); the TTL is
    not, and min(TTL, MINIMUM) is what a client keeps the answer for: still capped."""
    from tests.conftest import running_daemon

    async with running_daemon(tmp_path, [upstream.address],
                              extra="[dns]\nmax_negative_ttl = 600") as small:
        reply = await query(small, "signed-longneg.test", do=True)
        ttl, minimum = _soa(reply)
        assert ttl == 600 and minimum == 2**31 - 1
        (rrsig,) = [r for r in reply.authority if r.rdtype == dns.rdatatype.RRSIG]
        assert rrsig.ttl == 600  # (its TTL is not signed either)
        ttl, minimum = _soa(await query(small, "longneg.test"))
        assert (ttl, minimum) == (600, 600)
        # An answer that is not negative keeps its TTLs (max_ttl applies, not this).
        positive = await query(small, "a.test")
        assert positive.answer[0].ttl == 300
