"""One client must not take the resolver down: every table keyed by a client or a name has a
bound and O(1) work per query (issue 12). Pure parts are driven directly with time passed in;
listeners are tested over real loopback sockets."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.daemons import within
from tiktokguard.config import IncidentsConfig
from tiktokguard.dns.upstream import UpstreamPool
from tiktokguard.dns.wire import parse_query, text_to_wire
from tiktokguard.incidents import IncidentAggregator
from tiktokguard.metrics import Metrics


class CountingDict(OrderedDict):  # type: ignore[type-arg]
    """An OrderedDict that counts the entries any scan of it visits."""

    visited = 0

    def items(self) -> Any:
        parent = super().items()

        def counted() -> Iterator[Any]:
            for item in parent:
                CountingDict.visited += 1
                yield item
        return counted()


def _query(name: str = "www.tiktok.com") -> Any:
    header = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    return parse_query(header + text_to_wire(name) + b"\x00\x01\x00\x01")


def test_incidents_cost_o1_per_blocked_query_however_many_are_open() -> None:
    metrics = Metrics()
    agg = IncidentAggregator(IncidentsConfig(max_open=20_000), metrics)
    agg.open = CountingDict()
    query = _query()
    for i in range(20_000):  # the table fills up within one window
        agg.blocked(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", None, query, "tiktok.com", 1.0)
    CountingDict.visited = 0
    for i in range(5_000):  # full: each new pair must not scan the table
        agg.blocked(f"10.200.{i >> 8}.{i & 255}", None, query, "tiktok.com", 2.0)
    assert CountingDict.visited <= 5_000  # one peek at the front per new pair, not 20 000
    assert len(agg.open) == 20_000
    assert metrics.sample("tiktokguard_incidents_overflow_total") == 5_000
    # A window later the oldest leave from the front, as many as there are new ones.
    CountingDict.visited = 0
    for i in range(1_000):
        agg.blocked(f"10.201.{i >> 8}.{i & 255}", None, query, "tiktok.com", 700.0)
    assert len(agg.open) == 1_000  # everything from t=1 is gone, the new ones are in
    assert CountingDict.visited <= 20_000 + 2 * 1_000  # each entry left once: amortised O(1)


def test_a_closed_window_reopens_at_the_back() -> None:
    agg = IncidentAggregator(IncidentsConfig(max_open=10), Metrics())
    query = _query()
    agg.blocked("10.0.0.1", None, query, "tiktok.com", 0.0)
    agg.blocked("10.0.0.2", None, query, "tiktok.com", 100.0)
    first = agg.open["10.0.0.1", "tiktok.com"].incident_id
    agg.blocked("10.0.0.1", None, query, "tiktok.com", 650.0)  # its window closed: new incident
    assert agg.open["10.0.0.1", "tiktok.com"].incident_id != first
    assert list(agg.open) == [("10.0.0.2", "tiktok.com"), ("10.0.0.1", "tiktok.com")]
    agg.blocked("10.0.0.3", None, query, "tiktok.com", 720.0)  # 10.0.0.2's window closed too
    assert list(agg.open) == [("10.0.0.1", "tiktok.com"), ("10.0.0.3", "tiktok.com")]


async def test_a_full_table_gives_one_storm_event_a_window() -> None:
    now = [1.0]
    metrics = Metrics()
    agg = IncidentAggregator(IncidentsConfig(max_open=100), metrics, clock=lambda: now[0])
    for i in range(300):
        agg.blocked(f"2001:db8::{i:x}", None, _query(), "tiktok.com" if i % 3 else "capcut.com",
                    now[0])
    with capture_logs() as logs:
        await agg.flush()
        now[0] = 2.0
        agg.blocked("2001:db8::ffff", None, _query(), "tiktok.com", now[0])
        await agg.flush()  # overflowing again within the window: no second storm event
    storms = [line for line in logs if line["event"] == "incident_storm"]
    violations = [line for line in logs if line["event"] == "policy_violation"]
    assert len(violations) == 100 and len(storms) == 1
    assert storms[0]["untracked_queries"] == 200 and storms[0]["max_open"] == 100
    assert storms[0]["rules"] == {"tiktok.com": 134, "capcut.com": 66}  # (of i = 100..299)
    assert metrics.sample("tiktokguard_incidents_overflow_total") == 201


# -- upstream health ---------------------------------------------------------------------------

async def test_upstream_backoff_cannot_overflow() -> None:
    from tiktokguard.config import HostPort

    pool = UpstreamPool((HostPort("127.0.0.1", 9),), 0.1, clock=lambda: 1000.0)
    upstream = pool.upstreams[0]
    for _ in range(5_000):  # 2 ** 1030 overflowed a float before
        pool._failed(upstream, "timeout")
    assert upstream.failures == 5_000
    assert upstream.down_until == pytest.approx(1060.0)  # the longest back-off, 60 s
    assert upstream.srtt == pytest.approx(0.4)  # and its SRTT four timeouts at most
    assert upstream.probe is not None  # probed back in the background, once
    pool.close()
    assert upstream.probe is None


async def test_an_incident_flood_over_udp_is_answered_and_bounded(
        tmp_path: Any, upstream: Any) -> None:
    import dns.asyncquery
    import dns.message
    import dns.rcode

    from tests.conftest import running_daemon

    async with running_daemon(tmp_path, [upstream.address],
                              extra="[incidents]\nmax_open = 40") as tg:
        with capture_logs() as logs:
            for i in range(1, 121):  # 120 managed loopback hosts, each a new incident
                q = dns.message.make_query(f"v{i}.tiktok.com", "A")
                reply = await dns.asyncquery.udp(q, "127.0.0.1", port=tg.port,
                                                 source=f"127.0.0.{i}", timeout=3)
                assert reply.rcode() == dns.rcode.NXDOMAIN  # every one answered
            await tg.daemon.incidents.flush()
        incidents = tg.daemon.incidents
        assert len(incidents.open) == 40
        assert tg.metrics.sample("tiktokguard_incidents_overflow_total") == 80
        assert tg.metrics.sample("tiktokguard_incidents_total") == 40
        # Announced at the first overflow (the background flush runs meanwhile); the rest is
        # summed into the next window's event, and the counter has the total now.
        storms = [line for line in logs if line["event"] == "incident_storm"]
        assert len(storms) == 1 and 1 <= storms[0]["untracked_queries"] <= 80


# -- TCP: slots, idle timer, back-pressure, half-close -----------------------------------------

def _frame(name: str, rdtype: str = "A") -> bytes:
    import struct

    import dns.message

    wire = dns.message.make_query(name, rdtype).to_wire()
    return struct.pack("!H", len(wire)) + wire


async def _answer(reader: Any) -> Any:
    import struct

    import dns.message

    async def read() -> Any:
        length = struct.unpack("!H", await reader.readexactly(2))[0]
        return dns.message.from_wire(await reader.readexactly(length))

    return await within(3, read(), "an answer on the TCP connection")


async def _connect(tg: Any, source: str = "127.0.0.5") -> tuple[Any, Any]:
    import asyncio

    return await within(3, asyncio.open_connection("127.0.0.1", tg.port,
                                                   local_addr=(source, 0)),
                        "a TCP connection to the daemon")


async def _closed_by_server(reader: Any, seconds: float = 3.0) -> bool:
    import asyncio

    async with asyncio.timeout(seconds):
        return await reader.read() == b""


async def test_tcp_at_the_cap_sheds_the_longest_idle(tmp_path: Any, upstream: Any) -> None:
    from tests.conftest import running_daemon

    async with running_daemon(tmp_path, [upstream.address],
                              extra="[dns]\nmax_tcp_connections = 2") as tg:
        first, second = await _connect(tg), await _connect(tg)
        for reader, writer in (first, second):  # first idle longest, then second
            writer.write(_frame("a.test"))
            assert (await _answer(reader)).answer
        third = await _connect(tg)
        third[1].write(_frame("b.a.test"))
        assert (await _answer(third[0])).answer  # the newcomer is served ...
        assert await _closed_by_server(first[0])  # ... in the place of the longest idle
        second[1].write(_frame("c.a.test"))
        assert (await _answer(second[0])).answer
        assert tg.daemon.server.governor.closed[("tcp", "shed")] == 1
        for _reader, writer in (first, second, third):
            writer.close()


async def test_tcp_at_the_cap_with_every_connection_busy_refuses_the_newcomer(
        tmp_path: Any, upstream: Any) -> None:
    from tests.conftest import running_daemon

    async with running_daemon(tmp_path, [upstream.address],
                              extra="[dns]\nmax_tcp_connections = 2") as tg:
        upstream.hold = True  # queries stay in flight: no connection is idle
        busy = [await _connect(tg), await _connect(tg)]
        for i, (_reader, writer) in enumerate(busy):
            writer.write(_frame(f"held{i}.a.test"))
        while len(upstream.held) < 2:
            await within(3, upstream.held_changed.wait(), "both queries at the upstream")
            upstream.held_changed.clear()
        newcomer = await _connect(tg)
        assert await _closed_by_server(newcomer[0])
        upstream.release()
        for reader, _writer in busy:
            assert (await _answer(reader)).answer
        assert tg.daemon.server.governor.refused[("tcp", "full")] == 1
        for _reader, writer in [*busy, newcomer]:
            writer.close()


async def test_one_prefix_cannot_take_every_tcp_slot(tmp_path: Any, upstream: Any) -> None:
    """17 addresses of one /24 with 64 busy connections each (1 088: more than the 1 000 slots)
    hold 64 slots when the /24 is one client: a client of another prefix is answered."""
    from tests.conftest import running_daemon

    async with running_daemon(tmp_path, [upstream.address],
                              extra="[dns]\ntcp_client_prefix_v4 = 24\n"
                                    "upstream_timeout_ms = 20000") as tg:
        upstream.hold = True  # every query stays in flight: no connection is idle to shed
        opened = []
        for host in range(1, 18):
            for _ in range(64):
                opened.append(await _connect(tg, f"127.0.9.{host}"))
                opened[-1][1].write(_frame(f"held{len(opened)}.a.test"))
        # Accepted in order: once the last is closed, every one before it was decided.
        assert await _closed_by_server(opened[-1][0])
        governor = tg.daemon.server.governor
        assert len(governor) == 64
        assert governor.refused[("tcp", "per_client")] == 17 * 64 - 64
        while len(upstream.held) < 64:  # the admitted ones are busy
            await within(5, upstream.held_changed.wait(), "64 queries at the upstream")
            upstream.held_changed.clear()
        other = await _connect(tg, "127.0.0.77")
        other[1].write(_frame("www.tiktok.com"))  # answered by the policy, not the upstream
        assert (await _answer(other[0])).rcode() == 3  # NXDOMAIN: the block answer
        assert governor.closed[("tcp", "shed")] == 0
        upstream.release()
        for _reader, writer in [*opened, other]:
            writer.close()


async def test_tcp_per_client_cap_leaves_room_for_others(tmp_path: Any, upstream: Any) -> None:
    from tests.conftest import running_daemon

    async with running_daemon(tmp_path, [upstream.address],
                              extra="[dns]\nmax_tcp_per_client = 3") as tg:
        mine = [await _connect(tg, "127.0.0.5") for _ in range(3)]
        for reader, writer in mine:
            writer.write(_frame("a.test"))
            assert (await _answer(reader)).answer
        fourth = await _connect(tg, "127.0.0.5")
        assert await _closed_by_server(fourth[0])
        other = await _connect(tg, "127.0.0.6")
        other[1].write(_frame("a.test"))
        assert (await _answer(other[0])).answer
        for _reader, writer in [*mine, fourth, other]:
            writer.close()


async def test_tcp_trickled_bytes_keep_no_connection_open(tmp_path: Any,
                                                          upstream: Any) -> None:
    import asyncio

    from tests.conftest import running_daemon

    async with running_daemon(tmp_path, [upstream.address],
                              extra="[dns]\ntcp_idle_timeout_ms = 400") as tg:
        reader, writer = await _connect(tg)
        frame = _frame("a.test")
        closed = asyncio.create_task(_closed_by_server(reader, 5.0))
        # One byte every 100 ms, never a whole message (bounded: 40 bytes at most).
        for byte in frame[:40]:
            if closed.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)
        assert closed.done() and closed.result()  # closed while it was still trickling
        writer.close()


async def test_tcp_client_that_does_not_read_is_not_read_from(tmp_path: Any,
                                                              upstream: Any) -> None:
    import asyncio
    import socket

    from tests.conftest import running_daemon
    from tiktokguard.dns.server import OUTPUT_HIGH

    async with running_daemon(tmp_path, [upstream.address]) as tg:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.5", 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", tg.port))
        chunk = _frame("www.tiktok.com") * 2000  # blocked: answered at once, ~3x larger
        sent, stalled = 0, 0
        while sent < 32 * 1024 * 1024 and stalled < 20:  # bounded in bytes and in time
            try:
                sent += sock.send(chunk)
                stalled = 0
            except BlockingIOError:
                stalled += 1
                await asyncio.sleep(0.02)
        (connection,) = tg.daemon.server.tcp_connections
        assert connection.transport is not None
        # The daemon stopped reading once the answers piled up: what it holds for this client
        # is bounded, and the client could not push its 32 MiB.
        assert connection.transport.get_write_buffer_size() <= OUTPUT_HIGH + 64 * 1024
        assert sent < 32 * 1024 * 1024
        # Everyone else is still served meanwhile.
        other = await _connect(tg, "127.0.0.6")
        other[1].write(_frame("a.test"))
        assert (await _answer(other[0])).answer
        other[1].close()
        sock.close()


async def test_tcp_half_closed_client_gets_its_answers(tmp_path: Any, upstream: Any) -> None:
    from tests.conftest import running_daemon

    async with running_daemon(tmp_path, [upstream.address]) as tg:
        reader, writer = await _connect(tg)
        writer.write(_frame("www.tiktok.com") + _frame("a.test") + _frame("b.a.test"))
        writer.write_eof()  # queries sent; the client's side is closed
        answers = [await _answer(reader) for _ in range(3)]
        assert sorted(a.question[0].name.to_text() for a in answers) == [
            "a.test.", "b.a.test.", "www.tiktok.com."]
        assert await _closed_by_server(reader)
        writer.close()


# -- per-client rate limiting ------------------------------------------------------------------

def test_token_bucket_refills_at_the_rate() -> None:
    from tiktokguard.dns.ratelimit import RateLimiter

    limiter = RateLimiter(qps=10, burst=20)
    assert sum(limiter.allow("10.0.0.1", 0.0) for _ in range(30)) == 20  # the burst
    assert not limiter.allow("10.0.0.1", 0.05)  # half a token back
    assert limiter.allow("10.0.0.1", 0.1)  # one token a tenth of a second
    assert sum(limiter.allow("10.0.0.1", 100.0) for _ in range(30)) == 20  # capped at burst
    assert limiter.allow("10.0.0.2", 100.0)  # another client has its own bucket


def test_each_limited_client_gets_its_own_slip() -> None:
    from tiktokguard.dns.ratelimit import RateLimiter

    limiter = RateLimiter(qps=1, burst=1)
    for client in ("10.0.0.1", "10.0.0.2"):
        assert limiter.allow(client, 0.0)
    slips: dict[str, list[bool]] = {"10.0.0.1": [], "10.0.0.2": []}
    for _ in range(4):  # the two limited clients' queries interleaved
        for client in slips:
            assert not limiter.allow(client, 0.0)
            slips[client].append(limiter.slip(client))
    assert slips == {c: [True, False, True, False] for c in slips}  # each gets its TC=1 half


def test_ipv6_clients_share_a_bucket_per_56() -> None:
    from tiktokguard.dns.ratelimit import RateLimiter

    limiter = RateLimiter(qps=1, burst=2)
    assert limiter.allow("2001:db8:0:100::1", 0.0)
    assert limiter.allow("2001:db8:0:1ff:abcd::2", 0.0)  # same /56
    assert not limiter.allow("2001:db8:0:1ff::3", 0.0)
    assert limiter.allow("2001:db8:0:200::1", 0.0)  # the next /56


def test_a_spoofed_many_source_flood_keeps_the_table_bounded() -> None:
    from tiktokguard.dns.ratelimit import RateLimiter

    limiter = RateLimiter(qps=5, max_clients=1_000)
    for i in range(50_000):
        limiter.allow(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", i / 10_000)
    assert len(limiter) == 1_000
    assert len(limiter._keys) <= 65_536


async def test_a_flooding_client_is_limited_and_others_are_not(tmp_path: Any,
                                                               upstream: Any) -> None:
    import asyncio
    import socket
    import time

    import dns.asyncquery
    import dns.flags
    import dns.message
    import dns.rcode

    from tests.conftest import running_daemon

    extra = "[dns]\nrate_limit_qps = 20\nrate_limit_burst = 40"
    async with running_daemon(tmp_path, [upstream.address], extra=extra) as tg:
        loop = asyncio.get_running_loop()
        wire = dns.message.make_query("a.test", "A").to_wire()
        replies: list[bytes] = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.5", 0))
            sock.setblocking(False)
            started = time.monotonic()
            for _ in range(200):  # a burst of 200 from one client, bounded
                await loop.sock_sendto(sock, wire, ("127.0.0.1", tg.port))
            async with asyncio.timeout(3):
                while len(replies) < 200:
                    replies.append(await loop.sock_recv(sock, 4096))
            elapsed = time.monotonic() - started
        answers = [dns.message.from_wire(r) for r in replies]
        ok = [a for a in answers if a.rcode() == dns.rcode.NOERROR and a.answer]
        refused = [a for a in answers if a.rcode() == dns.rcode.REFUSED]
        slipped = [a for a in answers if a.flags & dns.flags.TC]
        # The burst, and what refilled at 20/s while the daemon worked through them.
        assert 40 <= len(ok) <= 40 + int(20 * elapsed) + 1
        assert abs(len(refused) - len(slipped)) <= 1 and len(ok) + len(refused) + len(
            slipped) == 200
        assert tg.metrics.sample("tiktokguard_dns_rate_limited_total") == 200 - len(ok)
        # Another client is untouched, and the limited one still gets through over TCP.
        other = await dns.asyncquery.udp(dns.message.make_query("a.test", "A"), "127.0.0.1",
                                         port=tg.port, source="127.0.0.6", timeout=3)
        assert other.rcode() == dns.rcode.NOERROR
        over_tcp = await dns.asyncquery.tcp(dns.message.make_query("a.test", "A"), "127.0.0.1",
                                            port=tg.port, source="127.0.0.5", timeout=3)
        assert over_tcp.rcode() == dns.rcode.NOERROR and over_tcp.answer


# -- cache: bytes, TTLs, unreadable answers ------------------------------------------------------

async def test_the_cache_is_bounded_in_bytes(tmp_path: Any, upstream: Any) -> None:
    import dns.asyncquery
    import dns.message

    from tests.conftest import running_daemon

    # The fake upstream builds each ~60 KB answer on the daemon's own event loop (~0.1 s on a
    # busy machine, after a UDP try that comes back truncated): the test's usual 300 ms upstream
    # timeout turned one of them into SERVFAIL now and then. This test is about the cache.
    extra = f"[dns]\ncache_max_bytes = {1024 * 1024}\nupstream_timeout_ms = 2500"
    async with running_daemon(tmp_path, [upstream.address], extra=extra) as tg:
        for i in range(40):  # 40 answers of ~60 KB each: 2.4 MB of answers
            q = dns.message.make_query(f"huge{i}.test", "TXT")
            reply = await dns.asyncquery.tcp(q, "127.0.0.1", port=tg.port, source="127.0.1.5",
                                             timeout=5)
            assert reply.answer and len(reply.answer[0]) == 240, reply
        cache = tg.daemon.cache
        assert cache.bytes <= 1024 * 1024
        assert 0 < len(cache) < 40  # the least recently used went first


def test_cache_entries_are_weighed_by_their_size() -> None:
    from tiktokguard.dns.cache import AnswerCache, CacheEntry

    cache = AnswerCache(max_entries=1000, max_bytes=100_000)
    for i in range(100):
        cache.put((b"\x01a\x00", i, 1, False, 0), CacheEntry(b"x" * 10_000, (), 0.0, 60.0, 12))
    assert cache.bytes <= 100_000 and len(cache) == 4
    cache.resize(1000, 50_000)
    assert cache.bytes <= 50_000 and len(cache) == 2
    cache.clear()
    assert cache.bytes == 0


async def test_upstream_ttls_are_capped(tmp_path: Any, upstream: Any) -> None:
    import dns.asyncquery
    import dns.message

    from tests.conftest import running_daemon

    async with running_daemon(tmp_path, [upstream.address]) as tg:
        # The fake says 1 000 000 s for this AAAA; nobody may keep it more than a day.
        q = dns.message.make_query("x.tiktokv.com", "AAAA")
        reply = await dns.asyncquery.udp(q, "127.0.0.1", port=tg.port, source="127.0.1.5",
                                         timeout=3)
        assert reply.answer and reply.answer[0].ttl == 86_400
        again = await dns.asyncquery.udp(q, "127.0.0.1", port=tg.port, source="127.0.1.6",
                                         timeout=3)
        assert again.answer[0].ttl <= 86_400


def test_negative_answers_are_cached_an_hour_at_most() -> None:
    import dns.message
    import dns.rrset

    from tiktokguard.dns.cache import cache_ttl
    from tiktokguard.dns.wire import index_response

    q = dns.message.make_query("nx.example", "A")
    r = dns.message.make_response(q)
    r.set_rcode(3)
    r.authority.append(dns.rrset.from_text(
        "example.", 86_400, "IN", "SOA", "ns.example. h.example. 1 3600 600 864000 86400"))
    index = index_response(r.to_wire())
    assert cache_ttl(index) == 3_600
    assert cache_ttl(index, max_negative_ttl=600) == 600


async def test_an_unreadable_upstream_answer_fails_closed(tmp_path: Any, upstream: Any) -> None:
    import dns.asyncquery
    import dns.message
    import dns.rcode

    from tests.conftest import running_daemon

    async with running_daemon(tmp_path, [upstream.address]) as tg:
        for source in ("127.0.0.5", "127.0.1.5"):  # managed, then unmanaged
            reply = await dns.asyncquery.udp(dns.message.make_query("badname.test", "A"),
                                             "127.0.0.1", port=tg.port, source=source,
                                             timeout=3)
            assert reply.rcode() == dns.rcode.SERVFAIL and not reply.answer
        assert tg.metrics.sample("tiktokguard_upstream_errors_total",
                                 upstream=upstream.address, kind="malformed") == 2
        assert tg.metrics.sample("tiktokguard_dns_queries_total", transport="udp",
                                 decision="error") == 2


# -- the HTTP API ------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "field"), [
    (b"[" * 30_000 + b"]" * 30_000, None),  # nested past the parser's recursion, < 64 KiB
    (b'{"name": ' + b"9" * 5000 + b"}", None),  # an integer over 4300 digits
    (b'{"name": "\\ud800", "addresses": ["127.0.0.20"], "custodian": "c", "supervisor": "s",'
     b' "ticket": "t"}', "name"),  # a lone surrogate
    ('{"name": "phone \u202egnp.exe", "addresses": ["127.0.0.20"], "custodian": "c", '
     '"supervisor": "s", "ticket": "t"}'.encode(), "name"),  # a bidi override
    ('{"name": "phone", "addresses": ["127.0.0.20"], "custodian": "c\u0085c", '
     '"supervisor": "s", "ticket": "t"}'.encode(), "custodian"),  # a C1 control
    (b'{"name": "phone", "addresses": ["127.0.0.20"], "custodian": "c", "supervisor": "s",'
     b' "ticket": "t", "expires_at": "9999-12-31T23:59:59-23:59"}', "expires_at"),
])
async def test_bad_api_input_is_a_400(tmp_path: Any, upstream: Any, body: bytes,
                                      field: str | None) -> None:
    import aiohttp

    from tests.conftest import running_daemon
    from tests.test_api import ADMIN, TOKENS

    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True) as tg, \
            aiohttp.ClientSession() as http, \
            http.post(f"http://127.0.0.1:{tg.http_port}/api/v1/devices", data=body,
                      headers=headers) as response:
        assert response.status == 400, await response.text()
        assert (await response.json())["field"] == field


async def test_extreme_since_is_a_400_for_a_viewer(tmp_path: Any, upstream: Any) -> None:
    import aiohttp

    from tests.conftest import running_daemon
    from tests.test_api import TOKENS, VIEWER

    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True) as tg, \
            aiohttp.ClientSession() as http:
        for since in ("0001-01-01T00:00:00%2B23:59", "9999-12-31T23:59:59-23:59"):
            async with http.get(f"http://127.0.0.1:{tg.http_port}/api/v1/audit?since={since}",
                                headers={"Authorization": f"Bearer {VIEWER}"}) as response:
                assert response.status == 400
                assert (await response.json())["field"] == "since"


async def test_metrics_are_rendered_at_most_once_a_second_and_never_stale(
        tmp_path: Any, upstream: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import time

    import aiohttp
    import dns.asyncquery
    import dns.message

    import tiktokguard.daemon as daemon_module
    from tests.conftest import running_daemon

    renders = [0]
    real = daemon_module.generate_latest

    def counting(registry: Any) -> bytes:
        renders[0] += 1
        return real(registry)

    monkeypatch.setattr(daemon_module, "generate_latest", counting)
    async with running_daemon(tmp_path, [upstream.address], http=True) as tg, \
            aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{tg.http_port}/metrics"

        async def scrape() -> str:
            async with http.get(url) as response:
                assert response.status == 200
                return await response.text()

        started = time.monotonic()
        pages = await asyncio.gather(*(scrape() for _ in range(50)))  # a scraper storm
        elapsed = time.monotonic() - started
        assert len(pages) == 50 and renders[0] <= 1 + int(elapsed)  # once a second at most
        await dns.asyncquery.udp(dns.message.make_query("www.tiktok.com", "A"), "127.0.0.1",
                                 port=tg.port, source="127.0.0.5", timeout=3)
        before = renders[0]
        page = await scrape()  # within the second: waits for the next rendering
        assert renders[0] == before + 1
        assert 'tiktokguard_dns_queries_total{decision="blocked",transport="udp"} 1.0' in page


async def test_api_connections_are_capped_and_slow_headers_time_out(
        tmp_path: Any, upstream: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import contextlib

    import aiohttp
    import dns.asyncquery
    import dns.message
    import dns.rcode

    import tiktokguard.api.server as server_module
    from tests.conftest import running_daemon

    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 20)
    monkeypatch.setattr(server_module, "HEADER_SECONDS", 1.0)
    async with running_daemon(tmp_path, [upstream.address], http=True) as tg:
        slow = []
        for _ in range(30):  # headers begun, never finished
            reader, writer = await asyncio.open_connection("127.0.0.1", tg.http_port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: tiktokguard\r\n")
            slow.append((reader, writer))
        # Ten over the cap are closed at once; DNS does not notice any of it.
        reply = await dns.asyncquery.udp(dns.message.make_query("a.test", "A"), "127.0.0.1",
                                         port=tg.port, source="127.0.0.5", timeout=3)
        assert reply.rcode() == dns.rcode.NOERROR
        # All thirty are closed by the server: at once, or at the header deadline (bounded).
        async with asyncio.timeout(5):
            for reader, _writer in slow:
                # (closed with our half-sent header unread: a reset, closed all the same)
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
        assert tg.metrics.sample("tiktokguard_api_connections_refused_total") == 10
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{tg.http_port}/healthz") as response:
            assert response.status == 200  # room again for a real client
        for _reader, writer in slow:
            writer.close()


def test_devices_listing_escapes_what_a_terminal_would_obey() -> None:
    from tiktokguard.devices.cli import _details, _table

    row = {"id": "dev-1", "name": "phone \u202egnp.exe", "addresses": ["10.0.0.1"],
           "macs": [], "custodian": "c\x1b[2J", "active": True}
    for text in (_table([row]), _details(row, [])):
        assert "\u202e" not in text and "\x1b" not in text
        assert "\\u202e" in text and "\\u001b" in text


async def test_an_upstream_failing_every_name_is_answered_and_kept(tmp_path: Any,
                                                                   upstream: Any) -> None:
    import asyncio

    import dns.asyncquery
    import dns.message
    import dns.rcode

    from tests.conftest import running_daemon

    upstream.servfail_all = True
    async with running_daemon(tmp_path, [upstream.address]) as tg:
        async def ask(i: int) -> int:
            q = dns.message.make_query(f"n{i}.lame.test", "A")
            reply = await dns.asyncquery.udp(q, "127.0.0.1", port=tg.port,
                                             source=f"127.0.1.{i % 200 + 1}", timeout=5)
            return reply.rcode()

        rcodes = []
        for start in range(0, 1_100, 100):  # past the ~1 030 failures that overflowed before
            rcodes += await asyncio.gather(*(ask(i) for i in range(start, start + 100)))
        assert rcodes == [dns.rcode.SERVFAIL] * 1_100  # every one answered
        state = tg.daemon.pool.upstreams[0]
        assert state.failures == 0 and state.down_until == 0.0  # it answered: not set aside
        assert tg.metrics.sample("tiktokguard_upstream_errors_total", upstream=upstream.address,
                                 kind="servfail") == 1_100
        # Alive, but of no use: readiness says so once the window has passed (as if the
        # resolver had been up a minute, so "since start" does not excuse it).
        tg.daemon.pool.created -= 60
        assert tg.daemon.readiness()["upstreams"][0] is False


async def test_the_store_syncs_every_commit(tmp_path: Any) -> None:
    from tiktokguard.devices.store import SqliteStore

    store = await SqliteStore.open(tmp_path / "s.sqlite3")
    try:
        assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        await store.close()


async def test_a_request_the_client_got_wrong_is_counted_not_logged(
        tmp_path: Any, upstream: Any, capfd: Any) -> None:
    """A NUL in a header (schemathesis sends one) is a 400 and one count, never a traceback in
    the daemon's output: no client writes into the log at will."""
    import asyncio

    from tests.conftest import running_daemon

    async with running_daemon(tmp_path, [upstream.address], http=True) as tg:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", tg.http_port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: tiktokguard\r\nX-Probe: \x00\r\n\r\n")
            async with asyncio.timeout(5):
                reply = await reader.read()
            writer.close()
            assert reply.split(b" ")[1] == b"400", reply[:80]
        assert tg.metrics.sample("tiktokguard_http_malformed_requests_total",
                                 listener="api") == 3
    output = capfd.readouterr()
    assert "Traceback" not in output.out + output.err
    assert "X-Probe" not in output.out + output.err


def test_the_http_server_log_counts_client_faults_and_says_the_rest_in_one_line() -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    from tiktokguard.logs import HttpServerLog

    counted: list[int] = []
    logger = HttpServerLog("api", lambda: counted.append(1))
    with capture_logs() as logs:
        try:
            raise BadHttpMessage("Invalid header value char")
        except BadHttpMessage:
            logger.exception("Error handling request from %s", "192.0.2.1")
        logger.debug("Error handling request from %s", "192.0.2.1")  # aiohttp: a bad method
        try:
            raise RuntimeError("a bug")
        except RuntimeError:
            logger.exception("Error handling request from %s", "192.0.2.1")
    assert counted == [1]
    assert logs[0].pop("exc_info")[0] is RuntimeError  # (rendered as one JSON field)
    assert logs == [{"event": "http_error", "log_level": "error", "listener": "api",
                     "message": "Error handling request from 192.0.2.1",
                     "error": "RuntimeError('a bug')"}]
