"""End to end over real loopback sockets: dnspython as the client, a fake upstream behind us."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from tests.conftest import (
    DEVICE_IP,
    MANAGED,
    OUTSIDER,
    RELAY,
    UNMANAGED,
    Running,
    ede_codes,
    queries,
    running_daemon,
)
from tests.daemons import within
from tests.fakes import FakeUpstream, free_port
from tiktokguard.dns.upstream import CHANNEL_USES
from tiktokguard.dns.wire import EDNS_OPTION_MAC

ALL_TYPES = ["A", "AAAA", "HTTPS", "SVCB", "CNAME", "TXT", "MX", "ANY", "NS", "SOA", "SRV"]


def soa_of(message: dns.message.Message) -> tuple[str, int, int]:
    """(owner, TTL, MINIMUM) of the authority SOA."""
    (rrset,) = message.authority
    assert rrset.rdtype == dns.rdatatype.SOA
    return rrset.name.to_text(), rrset.ttl, rrset[0].minimum


# -- blocking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_blocked_name_gets_nxdomain_with_soa_and_ede(tg: Running, upstream: FakeUpstream,
                                                           tcp: bool) -> None:
    reply = await tg.ask("www.tiktok.com", tcp=tcp)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.question[0].name.to_text() == "www.tiktok.com."
    assert soa_of(reply) == ("tiktok.com.", 300, 300)
    assert ede_codes(reply) == [15]
    assert "tiktok.com" in reply.options[0].text
    assert not reply.answer
    assert upstream.count("www.tiktok.com") == 0, "a blocked name must never be forwarded"
    transport = "tcp" if tcp else "udp"
    assert queries(tg, "blocked", transport) == 1
    assert tg.metrics.sample("tiktokguard_dns_blocked_total", rule="tiktok.com") == 1


@pytest.mark.parametrize("rdtype", ALL_TYPES)
async def test_every_query_type_is_blocked(tg: Running, rdtype: str) -> None:
    reply = await tg.ask("api16-normal-c-useast1a.tiktokv.com", rdtype)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert soa_of(reply)[0] == "tiktokv.com."


@pytest.mark.parametrize("name", ["TikTok.COM", "wWw.TiKtOk.CoM.", "tiktok.com", "a.b.c.douyin.com",
                                  "capcut.com", "v16m.byteoversea.com"])
async def test_matching_is_case_insensitive_and_covers_subdomains(tg: Running, name: str) -> None:
    reply = await tg.ask(name)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    # The question is echoed exactly as asked (case preserved, RFC 1035 §7.3 and 0x20 clients).
    assert reply.question[0].name.to_text() == name.rstrip(".") + "."


@pytest.mark.parametrize("name", ["nottiktok.com.test", "tiktok.com.a.test", "xtiktok.com"])
async def test_lookalike_names_are_not_blocked(tg: Running, name: str) -> None:
    reply = await tg.ask(name)
    assert reply.rcode() != dns.rcode.NXDOMAIN or soa_of(reply)[0] == "test."


async def test_query_without_edns_gets_no_opt(tg: Running) -> None:
    reply = await tg.ask("www.tiktok.com", use_edns=False)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.edns < 0
    assert soa_of(reply)[0] == "tiktok.com."


# -- client classes ------------------------------------------------------------------------------


async def test_client_outside_allow_clients_is_refused(tg: Running, upstream: FakeUpstream) -> None:
    for name in ("a.test", "www.tiktok.com"):
        reply = await tg.ask(name, source=OUTSIDER)
        assert reply.rcode() == dns.rcode.REFUSED
    assert upstream.count("a.test") == 0
    assert queries(tg, "refused", "udp") == 2


async def test_managed_client_gets_other_names_resolved(tg: Running) -> None:
    reply = await tg.ask("a.test")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer[0][0].address == "192.0.2.1"
    assert queries(tg, "allowed", "udp") == 1


async def test_unmanaged_client_is_not_filtered(tg: Running, upstream: FakeUpstream) -> None:
    reply = await tg.ask("cname-tiktok.test", source=UNMANAGED)
    assert reply.rcode() == dns.rcode.NOERROR
    assert [rr.rdtype for rr in reply.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    await tg.ask("www.tiktok.com", source=UNMANAGED)
    assert upstream.count("www.tiktok.com") == 1
    # Both count as `unmanaged`: the first led to a listed name through its CNAME, and the
    # decision says so (docs/design.md §1: any other served client is counted `unmanaged`).
    assert queries(tg, "unmanaged", "udp") == 2
    assert queries(tg, "allowed", "udp") == 0


async def test_allowlisted_device_by_ip_and_cidr(tg: Running, upstream: FakeUpstream) -> None:
    await tg.add_device(addresses=[DEVICE_IP])
    await tg.add_device(addresses=["127.0.0.96/29"])
    for source in (DEVICE_IP, "127.0.0.100"):
        reply = await tg.ask("www.tiktok.com", source=source)
        assert reply.rcode() == dns.rcode.NXDOMAIN  # the fake upstream's own NXDOMAIN
        assert soa_of(reply)[0] == "test.", "answer must come from upstream, not a block"
    assert upstream.count("www.tiktok.com") == 1  # second one from cache
    assert queries(tg, "allowlisted", "udp") == 2
    # A neighbour outside the CIDR is still blocked.
    reply = await tg.ask("www.tiktok.com", source="127.0.0.104")
    assert soa_of(reply)[0] == "tiktok.com."


async def test_device_change_takes_effect_on_next_query(tg: Running) -> None:
    assert soa_of(await tg.ask("tiktok.com", source=DEVICE_IP))[0] == "tiktok.com."
    device_id = await tg.add_device(addresses=[DEVICE_IP])
    assert soa_of(await tg.ask("tiktok.com", source=DEVICE_IP))[0] == "test."
    assert tg.daemon.devices_service is not None
    await tg.daemon.devices_service.deactivate(device_id, "test")
    assert soa_of(await tg.ask("tiktok.com", source=DEVICE_IP))[0] == "tiktok.com."


async def test_expired_device_is_blocked(tmp_path: Path, upstream: FakeUpstream) -> None:
    now = [1_000_000.0]
    async with running_daemon(tmp_path, [upstream.address], clock=lambda: now[0]) as tg:
        await tg.add_device(addresses=[DEVICE_IP], expires_at="1970-01-12T13:48:20Z")
        assert soa_of(await tg.ask("tiktok.com", source=DEVICE_IP))[0] == "test."
        now[0] = 1_000_100.0
        assert soa_of(await tg.ask("tiktok.com", source=DEVICE_IP))[0] == "tiktok.com."


def mac_option(mac: str) -> dns.edns.GenericOption:
    return dns.edns.GenericOption(EDNS_OPTION_MAC, bytes.fromhex(mac.replace(":", "")))


async def test_mac_from_trusted_relay_exempts_device(tmp_path: Path,
                                                     upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address]) as tg:
        await tg.add_device(macs=["02-00-5E-10-00-01"])
        option = [mac_option("02:00:5e:10:00:01")]
        reply = await tg.ask("tiktok.com", source=RELAY, options=option)
        assert soa_of(reply)[0] == "test.", "trusted relay's MAC option must be believed"
        # The MAC is personal data: it never reaches the upstream.
        forwarded = dns.message.from_wire(upstream.received[-1])
        assert forwarded.edns == 0
        assert all(o.otype != EDNS_OPTION_MAC for o in forwarded.options)
        # The same option from any other client is ignored.
        reply = await tg.ask("tiktok.com", source=MANAGED, options=option)
        assert soa_of(reply)[0] == "tiktok.com."
        # A different MAC through the relay is not exempt.
        reply = await tg.ask("tiktok.com", source=RELAY, options=[mac_option("02:00:5e:10:00:02")])
        assert soa_of(reply)[0] == "tiktok.com."


# -- bypass countermeasures ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rcode"), [
    ("use-application-dns.net", dns.rcode.NXDOMAIN),
    ("mask.icloud.com", dns.rcode.NXDOMAIN),
    ("mask-h2.icloud.com", dns.rcode.NXDOMAIN),
    ("_dns.resolver.arpa", dns.rcode.NOERROR),
])
async def test_bypass_countermeasures(tg: Running, upstream: FakeUpstream, name: str,
                                      rcode: int) -> None:
    reply = await tg.ask(name, "SVCB" if name.startswith("_dns") else "A")
    assert reply.rcode() == rcode
    assert not reply.answer
    assert soa_of(reply)[0] == name + "."
    assert upstream.count(name) == 0
    # Unmanaged clients are outside the policy: their queries go upstream untouched.
    await tg.ask(name, source=UNMANAGED)
    assert upstream.count(name) == 1


async def test_bypass_countermeasures_can_be_turned_off(tmp_path: Path,
                                                        upstream: FakeUpstream) -> None:
    extra = "[policy]\nbypass_countermeasures = false"
    async with running_daemon(tmp_path, [upstream.address], extra=extra) as tg:
        reply = await tg.ask("use-application-dns.net")
        assert soa_of(reply)[0] == "test."
        assert upstream.count("use-application-dns.net") == 1


async def test_public_doh_endpoints_blocked_for_managed_clients_when_enabled(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address],
                              extra="[policy]\nblock_public_doh = true") as tg:
        for name in ("dns.google", "mozilla.cloudflare-dns.com", "abc123.dns.nextdns.io"):
            reply = await tg.ask(name, "HTTPS" if "mozilla" in name else "A")
            assert reply.rcode() == dns.rcode.NXDOMAIN and soa_of(reply)[0] == name + "."
            assert [o.code for o in reply.options] == [17]  # EDE Filtered: a bypass
            assert upstream.count(name) == 0
        # The providers' web sites, and everyone outside the policy, are left alone.
        assert soa_of(await tg.ask("www.quad9.net"))[0] == "test."
        assert soa_of(await tg.ask("dns.google", source=UNMANAGED))[0] == "test."
        assert tg.metrics.sample("tiktokguard_dns_blocked_total", rule="dns.google") == 1
        assert tg.metrics.sample("tiktokguard_incidents_total") == 0  # not a TikTok incident


async def test_public_doh_blocking_is_off_by_default_and_follows_a_reload(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address]) as tg:
        assert soa_of(await tg.ask("dns.google"))[0] == "test."
        tg.config_path.write_text(tg.config_path.read_text().replace(
            "[policy]", "[policy]\nblock_public_doh = true"))
        assert await tg.daemon.reload("test")
        assert soa_of(await tg.ask("dns.google"))[0] == "dns.google."


# -- block modes ---------------------------------------------------------------------------------


async def test_block_mode_null(tmp_path: Path, upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address],
                              extra='[policy]\nblock_mode = "null"\nblock_ttl = 60') as tg:
        a = await tg.ask("www.tiktok.com", "A")
        assert a.rcode() == dns.rcode.NOERROR
        assert a.answer[0][0].address == "0.0.0.0" and a.answer[0].ttl == 60
        aaaa = await tg.ask("www.tiktok.com", "AAAA", tcp=True)
        assert aaaa.answer[0][0].address == "::"
        txt = await tg.ask("www.tiktok.com", "TXT")
        assert txt.rcode() == dns.rcode.NOERROR and not txt.answer
        assert soa_of(txt) == ("tiktok.com.", 60, 60)


async def test_block_mode_refused(tmp_path: Path, upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address],
                              extra='[policy]\nblock_mode = "refused"') as tg:
        reply = await tg.ask("www.tiktok.com")
        assert reply.rcode() == dns.rcode.REFUSED
        assert ede_codes(reply) == [15]


async def test_block_mode_redirect(tmp_path: Path, upstream: FakeUpstream) -> None:
    extra = ('[policy]\nblock_mode = "redirect"\nredirect_ipv4 = "192.0.2.80"\n'
             'redirect_ipv6 = "2001:db8::80"')
    async with running_daemon(tmp_path, [upstream.address], extra=extra) as tg:
        assert (await tg.ask("www.tiktok.com", "A")).answer[0][0].address == "192.0.2.80"
        assert (await tg.ask("www.tiktok.com", "AAAA")).answer[0][0].address == "2001:db8::80"
        mx = await tg.ask("www.tiktok.com", "MX")
        assert mx.rcode() == dns.rcode.NOERROR and not mx.answer


# -- forwarding ----------------------------------------------------------------------------------


async def test_large_answer_is_truncated_over_udp_and_complete_over_tcp(tg: Running) -> None:
    small = await tg.ask("big.test", "TXT", use_edns=False)
    assert small.flags & dns.flags.TC
    assert not small.answer
    edns = await tg.ask("big.test", "TXT", payload=512)
    assert edns.flags & dns.flags.TC
    full = await tg.ask("big.test", "TXT", tcp=True)
    assert not full.flags & dns.flags.TC
    assert len(full.answer[0]) == 40
    # Over 1232 octets (DNS Flag Day 2020) we truncate whatever size the client offers, so
    # answers never rely on IP fragmentation.
    big = await tg.ask("big.test", "TXT", payload=4096)
    assert big.flags & dns.flags.TC


async def test_upstream_truncation_is_retried_over_tcp(tg: Running, upstream: FakeUpstream) -> None:
    reply = await tg.ask("tc.test")
    assert reply.answer[0][0].address == "192.0.2.7"
    assert len(upstream.tcp_received) == 1


async def test_reply_with_wrong_id_is_ignored(tg: Running) -> None:
    reply = await tg.ask("spoof.test")
    assert reply.answer[0][0].address == "192.0.2.9"


async def test_upstream_queries_use_random_ids_and_ports(tg: Running,
                                                         upstream: FakeUpstream) -> None:
    count = 3 * CHANNEL_USES + 1
    await asyncio.gather(*(tg.ask(f"n{i}.a.test") for i in range(count)))
    ids = [struct.unpack("!H", wire[:2])[0] for wire in upstream.received]
    assert len(ids) == count and len(set(ids)) >= count - 5  # random 16-bit IDs
    # The source port changes (a new socket, a new random port) every CHANNEL_USES queries.
    ports = [port for _host, port in upstream.sources]
    assert len(set(ports)) == 4
    assert max(ports.count(p) for p in set(ports)) == CHANNEL_USES


async def test_failover_to_next_upstream(tmp_path: Path, upstream: FakeUpstream) -> None:
    dead = await FakeUpstream(silent=True).start()
    broken = await FakeUpstream(servfail_all=True).start()
    try:
        async with running_daemon(tmp_path, [dead.address, broken.address,
                                             upstream.address]) as tg:
            reply = await tg.ask("a.test")
            assert reply.answer[0][0].address == "192.0.2.1"
            assert len(dead.received) == 1 and len(broken.received) == 1
            await tg.daemon.pool.settled()  # the dead one's exchange ends with its timeout
            errors = "tiktokguard_upstream_errors_total"
            assert tg.metrics.sample(errors, upstream=dead.address, kind="timeout") == 1
            assert tg.metrics.sample(errors, upstream=broken.address, kind="servfail") == 1
    finally:
        dead.close()
        broken.close()


async def test_all_upstreams_down_gives_servfail_not_a_hang(tmp_path: Path) -> None:
    dead = await FakeUpstream(silent=True).start()
    refused_port = FakeUpstream()  # never started: ICMP port unreachable
    try:
        async with running_daemon(tmp_path, [dead.address, "127.0.0.1:9"]) as tg:
            loop = asyncio.get_running_loop()
            started = loop.time()
            reply = await tg.ask("a.test", wait=5)
            assert reply.rcode() == dns.rcode.SERVFAIL
            assert loop.time() - started < 2.0  # 300 ms timeout + fast refusal, not a hang
            assert queries(tg, "error", "udp") == 1
    finally:
        dead.close()
        refused_port.close()


async def test_upstream_dead_on_one_timeout_name_only(tg: Running) -> None:
    reply = await tg.ask("timeout.test", wait=5)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert ede_codes(reply) == [23]
    # Served from the failure cache (RFC 9520) for the next seconds: the same answer, EDE too.
    again = await tg.ask("timeout.test", wait=5)
    assert again.rcode() == dns.rcode.SERVFAIL and ede_codes(again) == [23]
    assert tg.metrics.sample("tiktokguard_cache_hits_total") == 1


# -- cache ---------------------------------------------------------------------------------------


async def test_cache_serves_hits_and_counts_ttl_down(tmp_path: Path,
                                                     upstream: FakeUpstream) -> None:
    now = [5_000.0]
    async with running_daemon(tmp_path, [upstream.address], clock=lambda: now[0]) as tg:
        first = await tg.ask("A.Test")
        now[0] += 100
        second = await tg.ask("a.TEST")
        assert upstream.count("a.test") == 1
        assert first.answer[0].ttl == 300 and second.answer[0].ttl == 200
        assert second.question[0].name.to_text() == "a.TEST."
        assert tg.metrics.sample("tiktokguard_cache_hits_total") == 1
        assert tg.metrics.sample("tiktokguard_cache_misses_total") == 1
        now[0] += 201
        await tg.ask("a.test")
        assert upstream.count("a.test") == 2


async def test_negative_answers_cached_for_soa_minimum(tmp_path: Path,
                                                       upstream: FakeUpstream) -> None:
    now = [5_000.0]
    async with running_daemon(tmp_path, [upstream.address], clock=lambda: now[0]) as tg:
        for name in ("missing.test", "nodata.test"):
            await tg.ask(name)
            now[0] += 59
            reply = await tg.ask(name)
            assert upstream.count(name) == 1
            assert reply.authority[0].ttl == 120 - 59
            now[0] += 1  # min(SOA TTL 120, MINIMUM 60) has passed
            await tg.ask(name)
            assert upstream.count(name) == 2


async def test_cache_key_includes_do_bit(tg: Running, upstream: FakeUpstream) -> None:
    q = dns.message.make_query("a.test", "A", want_dnssec=True)
    await dns.asyncquery.udp(q, "127.0.0.1", port=tg.port, source=MANAGED, timeout=2)
    await tg.ask("a.test")
    assert upstream.count("a.test") == 2


async def test_servfail_cached_only_briefly(tmp_path: Path, upstream: FakeUpstream) -> None:
    now = [5_000.0]
    async with running_daemon(tmp_path, [upstream.address], clock=lambda: now[0]) as tg:
        await tg.ask("servfail.test")
        await tg.ask("servfail.test")
        assert upstream.count("servfail.test") == 1
        now[0] += 5
        await tg.ask("servfail.test")
        assert upstream.count("servfail.test") == 2


async def test_cname_chain_to_blocked_name_is_blocked_for_managed(tg: Running) -> None:
    # Unmanaged first, so the managed query is answered from the cache: both paths must block.
    ok = await tg.ask("cname-tiktok.test", source=UNMANAGED)
    assert ok.answer
    for _ in range(2):
        reply = await tg.ask("cname-tiktok.test")
        assert reply.rcode() == dns.rcode.NXDOMAIN
        assert soa_of(reply)[0] == "tiktokcdn.com."
    assert tg.metrics.sample("tiktokguard_dns_blocked_total", rule="tiktokcdn.com") == 2
    fine = await tg.ask("cname-ok.test")
    assert fine.rcode() == dns.rcode.NOERROR and len(fine.answer) == 2


# -- odd and malformed queries -------------------------------------------------------------------


async def raw_udp(tg: Running, data: bytes, expect_reply: bool = True) -> bytes | None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((MANAGED, 0))
    try:
        await loop.sock_sendto(sock, data, ("127.0.0.1", tg.port))
        if not expect_reply:
            return None
        async with asyncio.timeout(2):
            return await loop.sock_recv(sock, 65535)
    finally:
        sock.close()


async def test_edns_version_1_gets_badvers(tg: Running) -> None:
    q = dns.message.make_query("a.test", "A", use_edns=1)
    reply = dns.message.from_wire(await raw_udp(tg, q.to_wire()))
    assert reply.rcode() == dns.rcode.BADVERS
    assert tg.metrics.sample("tiktokguard_malformed_queries_total", reason="badvers") == 1


async def test_unknown_edns_option_is_ignored(tg: Running) -> None:
    reply = await tg.ask("a.test", options=[dns.edns.GenericOption(65400, b"\x01\x02")])
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer


@pytest.mark.parametrize("opcode", [dns.opcode.NOTIFY, dns.opcode.STATUS, dns.opcode.UPDATE])
async def test_other_opcodes_get_notimp(tg: Running, opcode: int) -> None:
    q = dns.message.make_query("a.test", "A", use_edns=0)
    q.set_opcode(opcode)
    wire = q.to_wire()
    reply = await raw_udp(tg, wire)
    assert reply is not None
    rid, flags, qdcount = struct.unpack_from("!HHH", reply)
    assert rid == q.id and flags & 0xF == dns.rcode.NOTIMP and flags & 0x8000
    assert (flags >> 11) & 0xF == opcode  # the opcode echoed (RFC 1035 §4.1.1)
    assert not flags & 0x0080  # no RA: it says nothing of an opcode we do not implement
    # The question and the OPT stay in the error answer (RFC 6891 §7, docs/design.md §5), but
    # an UPDATE's first section is its zone, of type SOA (RFC 2136 §2.3): an A there is no
    # question to echo. Either way the answer parses.
    if opcode == dns.opcode.UPDATE:
        assert qdcount == 0
    else:
        assert qdcount == 1 and reply[12:12 + len(wire) - 12 - 11] == wire[12:len(wire) - 11]
    assert struct.unpack_from("!H", reply, 10)[0] == 1
    dns.message.from_wire(reply)


@pytest.mark.parametrize("qdcount", [0, 2])
async def test_qdcount_other_than_one_gets_formerr(tg: Running, qdcount: int) -> None:
    question = b"\x01a\x04test\x00\x00\x01\x00\x01"
    data = struct.pack("!HHHHHH", 0x1234, 0x0100, qdcount, 0, 0, 0) + question * qdcount
    reply = await raw_udp(tg, data)
    assert reply is not None
    rid, flags = struct.unpack_from("!HH", reply)
    assert rid == 0x1234 and flags & 0xF == dns.rcode.FORMERR and flags & 0x8000
    assert tg.metrics.sample("tiktokguard_malformed_queries_total", reason="formerr") == 1


@pytest.mark.parametrize("data", [b"", b"\x12", b"\x12\x34\x01\x00\x00\x01"])
async def test_short_packets_are_dropped_and_counted(tg: Running, data: bytes) -> None:
    await raw_udp(tg, data, expect_reply=False)
    # The server is still answering, and the drop was counted before that answer.
    assert (await tg.ask("a.test")).answer
    assert tg.metrics.sample("tiktokguard_malformed_queries_total", reason="short") == 1


async def test_truncated_question_gets_formerr(tg: Running) -> None:
    data = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x06tiktok\x03co"
    reply = await raw_udp(tg, data)
    assert reply is not None and struct.unpack_from("!HH", reply)[1] & 0xF == dns.rcode.FORMERR


# -- TCP -----------------------------------------------------------------------------------------


def frame(message: dns.message.Message) -> bytes:
    wire = message.to_wire()
    return struct.pack("!H", len(wire)) + wire


async def read_frame(reader: asyncio.StreamReader, seconds: float = 3) -> dns.message.Message:
    async def read() -> dns.message.Message:
        length = struct.unpack("!H", await reader.readexactly(2))[0]
        return dns.message.from_wire(await reader.readexactly(length))

    return await within(seconds, read(), "a TCP answer")


async def test_tcp_pipelined_queries_answered_on_one_connection(tg: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", tg.port, local_addr=(MANAGED, 0))
    queries = [dns.message.make_query(n, "A") for n in ("a.test", "www.tiktok.com", "b.a.test",
                                                       "douyin.com")]
    writer.write(b"".join(frame(q) for q in queries))
    async with asyncio.timeout(3):
        replies = {m.id: m for m in [await read_frame(reader) for _ in queries]}
    assert set(replies) == {q.id for q in queries}
    assert replies[queries[1].id].rcode() == dns.rcode.NXDOMAIN
    assert replies[queries[0].id].answer[0][0].address == "192.0.2.1"
    writer.close()


async def test_tcp_idle_connection_is_closed(tmp_path: Path, upstream: FakeUpstream) -> None:
    async with running_daemon(tmp_path, [upstream.address],
                              extra="[dns]\ntcp_idle_timeout_ms = 200") as tg:
        reader, writer = await asyncio.open_connection("127.0.0.1", tg.port)
        writer.write(frame(dns.message.make_query("a.test", "A")))
        async with asyncio.timeout(3):
            assert (await read_frame(reader)).answer
            assert await reader.read() == b""  # EOF: the server closed the idle connection
        writer.close()


# -- IPv6 ----------------------------------------------------------------------------------------


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_listener(tmp_path: Path, upstream: FakeUpstream) -> None:
    port = free_port("::1")
    extra = f'[dns]\nlisten = ["[::1]:{port}"]'
    async with running_daemon(tmp_path, [upstream.address], extra=extra):
        for tcp in (False, True):
            q = dns.message.make_query("www.tiktok.com", "AAAA", use_edns=0)
            send = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
            reply = await send(q, "::1", port=port, timeout=2)
            assert reply.rcode() == dns.rcode.NXDOMAIN
            reply = await send(dns.message.make_query("a.test", "A"), "::1", port=port,
                               timeout=2)
            assert reply.answer[0][0].address == "192.0.2.1"


# -- reload --------------------------------------------------------------------------------------


async def test_reload_swaps_lists_and_keeps_good_ones_on_error(tmp_path: Path,
                                                               upstream: FakeUpstream) -> None:
    lists = tmp_path / "mine.txt"
    lists.write_text("tiktok.com\n")
    extra = f'[policy]\nblocklists = ["{lists}"]'
    async with running_daemon(tmp_path, [upstream.address], extra=extra) as tg:
        assert soa_of(await tg.ask("douyin.com"))[0] == "test."
        lists.write_text("tiktok.com\ndouyin.com\n")
        assert await tg.daemon.reload("test")
        assert soa_of(await tg.ask("douyin.com"))[0] == "douyin.com."
        lists.write_text("tiktok.com\nthis is not a domain\n")
        assert not await tg.daemon.reload("test")
        assert "mine.txt:2" in (tg.daemon.list_error or "")
        assert soa_of(await tg.ask("douyin.com"))[0] == "douyin.com."  # previous lists kept
        assert tg.daemon.readiness_problems()
