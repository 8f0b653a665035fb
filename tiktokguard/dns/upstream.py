"""Upstream pool: forward a question to the upstream resolvers, with timeouts and failover.

Each upstream query gets a random ID, goes out from a random source port (a connected socket
whose port the kernel picks at random, replaced after CHANNEL_USES queries), and a reply is
accepted only from the upstream's address with our ID and our question: the defences against
off-path spoofing of RFC 5452 §9. A truncated UDP reply is retried over TCP.

Which upstream is asked, as Unbound's infrastructure cache and dnsdist do: each upstream has a
smoothed round-trip time (SRTT); the one with the lowest is asked first, and when it has not
answered after max(3 x its SRTT, 50 ms) the next is asked too (a hedge): the first usable answer
wins, and the slower exchange finishes in the background to keep its SRTT honest. A timeout or
network error raises an upstream's SRTT to at least the timeout at once, so one failure is enough
to stop preferring it; after FAILURES_BEFORE_DOWN in a row it is set aside (no client waits for
it) and probed back in the background with a query for the root's NS, on a doubling back-off.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tiktokguard.config import HostPort
from tiktokguard.dns.wire import (
    QR,
    RD,
    REFUSED,
    SERVFAIL,
    TC,
    RecordIndex,
    build_query,
    index_response,
)

_HEADER = struct.Struct("!HHHHHH")
# Queries one upstream socket carries before a new one (a new random source port) takes over.
# A socket per query was ~20 % of a cache miss's CPU (py-spy, bench/README.md); a new one every
# 64 queries keeps the port moving at a small fraction of that cost.
CHANNEL_USES = 64
FAILURES_BEFORE_DOWN = 3
DOWN_SECONDS = (5.0, 60.0)  # first and longest back-off of an upstream that keeps failing
INITIAL_SRTT = 0.05  # an upstream not heard from yet (ties keep the configured order)
SRTT_WEIGHT = 0.3  # of a new sample (the smoothing of RFC 6298, quicker)
HEDGE_MIN = 0.05  # the next upstream is asked after max(3 x SRTT, this) at the soonest
ROOT = b"\x00"
TYPE_NS = 2


class UpstreamError(Exception):
    """One upstream failed; kind is the `kind` label of tiktokguard_upstream_errors_total."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class AllUpstreamsFailed(Exception):
    """No upstream gave a usable answer; the server answers SERVFAIL."""


@dataclass(slots=True)
class Upstream:
    address: HostPort
    failures: int = 0  # consecutive timeouts and network errors
    down_until: float = 0.0  # set aside (probed in the background) until then
    last_success: float = 0.0
    last_failure: float = 0.0
    srtt: float = INITIAL_SRTT  # seconds
    probe: asyncio.Task[None] | None = None  # the background probe of a set-aside upstream
    channel: _Channel | None = None
    tls: _TlsChannel | None = None  # DoT upstreams: the connection in use
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def sample(self, rtt: float) -> None:
        self.srtt += SRTT_WEIGHT * (rtt - self.srtt)

    @property
    def name(self) -> str:
        return str(self.address)


class _Channel(asyncio.DatagramProtocol):
    """One connected UDP socket to one upstream; its queries told apart by their IDs."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[Callable[[bytes], bool], asyncio.Future[bytes]]] = {}
        self.uses = 0
        self.retired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12:
            return
        entry = self.pending.get((data[0] << 8) | data[1])
        if entry is not None and not entry[1].done() and entry[0](data):
            entry[1].set_result(data)
        # anything else (unknown ID, wrong question) is ignored: spoofed or late

    def error_received(self, exc: Exception) -> None:
        self._fail(UpstreamError("unreachable", str(exc)))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(UpstreamError("unreachable", "socket closed"))

    def _fail(self, error: UpstreamError) -> None:
        self.retired = True  # a socket that saw an error is not used again
        for _accept, future in self.pending.values():
            if not future.done():
                future.set_exception(error)

    def usable(self) -> bool:
        return not self.retired and self.uses < CHANNEL_USES and self.transport is not None

    def finished(self, qid: int) -> None:
        self.pending.pop(qid, None)
        if not self.usable() and not self.pending and self.transport is not None:
            self.transport.close()

    def retire(self) -> None:
        self.retired = True
        if not self.pending and self.transport is not None:
            self.transport.close()


class _TlsChannel:
    """One TLS connection to a DoT upstream (RFC 7858), reused and pipelined: queries go out as
    they come, answers are matched by ID and question as they arrive (in any order)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, tuple[Callable[[bytes], bool], asyncio.Future[bytes]]] = {}
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        error = UpstreamError("tls", "connection closed")
        try:
            while True:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
                data = await self.reader.readexactly(length)
                if len(data) < 12:
                    continue
                entry = self.pending.get((data[0] << 8) | data[1])
                if entry is not None and not entry[1].done() and entry[0](data):
                    entry[1].set_result(data)
        except (OSError, asyncio.IncompleteReadError) as exc:
            error = UpstreamError("tls", str(exc) or "connection closed")
        finally:
            self.closed = True
            for _accept, future in self.pending.values():
                if not future.done():
                    future.set_exception(error)
            self.writer.close()

    def close(self) -> None:
        self.closed = True
        self.task.cancel()
        self.writer.close()


@dataclass(slots=True)
class UpstreamReply:
    wire: bytes
    index: RecordIndex
    upstream: Upstream


Observer = Callable[[str, float], None]
ErrorCounter = Callable[[str, str], None]


def _matcher(qid: int, qname: bytes, qtype: int, qclass: int) -> Callable[[bytes], bool]:
    question = struct.pack("!HH", qtype, qclass)
    end = 12 + len(qname)

    def accept(data: bytes) -> bool:
        if len(data) < end + 4:
            return False
        rid, flags, qdcount = struct.unpack_from("!HHH", data)
        return (rid == qid and flags & QR != 0 and qdcount == 1
                and data[12:end].lower() == qname and data[end:end + 4] == question)
    return accept


Pending = dict[int, tuple[Callable[[bytes], bool], asyncio.Future[bytes]]]


def _expect(pending: Pending, qname: bytes, qtype: int, qclass: int
            ) -> tuple[int, asyncio.Future[bytes]]:
    """A fresh random ID for a question on a channel, and the future its answer will set."""
    qid = secrets.randbits(16)
    while qid in pending:
        qid = secrets.randbits(16)
    future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    pending[qid] = (_matcher(qid, qname, qtype, qclass), future)
    return qid, future


class UpstreamPool:
    def __init__(self, upstreams: tuple[HostPort, ...], timeout: float,
                 observe: Observer | None = None, count_error: ErrorCounter | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.upstreams = [Upstream(u) for u in upstreams]
        self.tls_context = tls_context  # for DoT upstreams (certificates checked against NAME)
        self.timeout = timeout
        self._observe = observe or (lambda name, seconds: None)
        self._count_error = count_error or (lambda name, kind: None)
        self._clock = clock
        self._inflight: dict[tuple[bytes, int, int, int, bool], asyncio.Future[UpstreamReply]] = {}
        self.created = clock()  # "no answer for N s" counts from here, not from clock zero
        self.closed = False
        self._background: set[asyncio.Future[UpstreamReply]] = set()

    def ordered(self, now: float) -> list[Upstream]:
        """The upstreams to ask, in order: those not set aside, lowest SRTT first (ties in the
        configured order). Only when every upstream is set aside are they all tried, soonest
        back first: a client then waits for them, since nothing else can answer."""
        healthy = sorted((u for u in self.upstreams if u.down_until <= now),
                         key=lambda u: u.srtt)
        if healthy:
            return healthy
        return sorted(self.upstreams, key=lambda u: u.down_until)

    def failing_since(self, now: float, window: float) -> bool:
        """True when upstream exchanges have failed and none succeeded for `window` seconds:
        all upstreams are down, as far as the queries tell (no probes are sent)."""
        success = max((u.last_success for u in self.upstreams), default=0.0)
        success = max(success, self.created)
        failure = max((u.last_failure for u in self.upstreams), default=0.0)
        return failure > success and now - success > window and now - failure < window

    async def resolve(self, qname: bytes, qtype: int, qclass: int, flags: int, do: bool
                      ) -> UpstreamReply:
        """The first usable answer from the upstreams; identical questions in flight share one
        upstream exchange. Raises AllUpstreamsFailed."""
        key = (qname, qtype, qclass, flags & 0x0030, do)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[UpstreamReply] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            reply = await self._resolve(qname, qtype, qclass, flags, do)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc if isinstance(exc, Exception) else AllUpstreamsFailed())
            future.exception()  # mark retrieved: waiters may not exist
            raise
        else:
            future.set_result(reply)
            return reply
        finally:
            del self._inflight[key]

    async def _resolve(self, qname: bytes, qtype: int, qclass: int, flags: int, do: bool
                       ) -> UpstreamReply:
        candidates = iter(self.ordered(self._clock()))
        loop = asyncio.get_running_loop()
        attempts: dict[asyncio.Future[UpstreamReply], tuple[Upstream, float]] = {}
        last: Exception | None = None
        servfail: UpstreamReply | None = None

        def ask() -> Upstream | None:
            upstream = next(candidates, None)
            if upstream is not None:
                task = loop.create_task(self._exchange(upstream, qname, qtype, qclass, flags, do))
                attempts[task] = (upstream, self._clock())
            return upstream

        latest = ask()  # the upstream asked last: the hedge delay is its
        if latest is None:
            raise AllUpstreamsFailed("no upstreams configured")
        exhausted = False
        try:
            while attempts:
                hedge = None if exhausted else max(3 * latest.srtt, HEDGE_MIN)
                done, _ = await asyncio.wait(attempts, timeout=hedge,
                                             return_when=asyncio.FIRST_COMPLETED)
                failed = not done  # (no answer within the hedge delay counts as one here)
                for task in done:
                    upstream, started = attempts.pop(task)
                    try:
                        reply = task.result()
                    except UpstreamError as exc:
                        self._failed(upstream, exc.kind)
                        last, failed = exc, True
                        continue
                    usable, kind = self._answered(upstream, reply, started)
                    if usable:
                        return reply
                    last, failed = UpstreamError(kind), True
                    if reply.index.rcode == SERVFAIL:
                        servfail = reply
                if failed and not exhausted:  # slow or failed: the next upstream is asked too
                    following = ask()
                    if following is None:
                        exhausted = True
                    else:
                        latest = following
        finally:
            for task, (upstream, started) in attempts.items():
                # Losers finish in the background (bounded by the timeout): their outcome keeps
                # their SRTT and health true.
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                task.add_done_callback(
                    lambda t, u=upstream, s=started: self._late(t, u, s))  # type: ignore[misc]
        if servfail is not None:
            return servfail  # the upstream's own SERVFAIL, with its EDE, is the truest answer
        raise AllUpstreamsFailed(str(last) if last else "no upstream answered")

    async def settled(self) -> None:
        """Wait until the exchanges that lost a race have ended (tests; at most the timeout)."""
        while self._background:
            await asyncio.wait(list(self._background))

    def _answered(self, upstream: Upstream, reply: UpstreamReply, started: float
                  ) -> tuple[bool, str]:
        """Account for an answer; (usable, the error kind when it is not)."""
        now = self._clock()
        # It answered, so it is alive, whatever it answered: a SERVFAIL or REFUSED for one name
        # (a lame delegation, a bogus signature) is not held against its health, or any client
        # could make us set a healthy upstream aside. (Readiness, below, counts only usable
        # answers: an upstream refusing everything is alive but of no use.)
        upstream.failures = 0
        upstream.down_until = 0.0
        rcode = reply.index.rcode
        if rcode == SERVFAIL and reply.index.dnssec_failure:
            upstream.last_success = now
            upstream.sample(now - started)
            self._observe(upstream.name, now - started)
            return True, ""  # validation failed: another validating upstream would agree
        if rcode in (SERVFAIL, REFUSED):
            # This upstream could not answer; another may (failover on SERVFAIL, docs/design.md §3).
            # Not usable, so no latency sample (a refusing upstream is fast) and a bad mark in
            # the `up` gauge's window. REFUSED is the upstream's own doing (its ACL), so it is
            # no longer preferred; a SERVFAIL may be the name's.
            kind = "servfail" if rcode == SERVFAIL else "refused"
            self._count_error(upstream.name, kind)
            upstream.last_failure = now
            if rcode == REFUSED:
                upstream.srtt = max(upstream.srtt, self.timeout)
            return False, kind
        upstream.last_success = now
        upstream.sample(now - started)
        self._observe(upstream.name, now - started)
        return True, ""

    def _late(self, task: asyncio.Future[UpstreamReply], upstream: Upstream,
              started: float) -> None:
        """An exchange nobody waits for any more (another upstream won) has ended."""
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, UpstreamError):
            self._failed(upstream, exc.kind)
        elif exc is None:
            self._answered(upstream, task.result(), started)

    def _failed(self, upstream: Upstream, kind: str) -> None:
        """A timeout or network error: the upstream may be down. One is enough to stop
        preferring it; FAILURES_BEFORE_DOWN in a row set it aside, to be probed back."""
        self._count_error(upstream.name, kind)
        now = self._clock()
        upstream.last_failure = now
        upstream.failures += 1
        # (bounded: a long outage must not grow it past what one good sample brings back)
        upstream.srtt = min(max(2 * upstream.srtt, self.timeout), 4 * self.timeout)
        if upstream.failures >= FAILURES_BEFORE_DOWN:
            first, longest = DOWN_SECONDS
            # (the exponent capped: 2 ** a thousand failures overflows a float)
            doublings = min(upstream.failures - FAILURES_BEFORE_DOWN, 16)
            wait = min(longest, first * 2 ** doublings)
            upstream.down_until = now + wait
            if upstream.probe is None and not self.closed:
                upstream.probe = asyncio.get_running_loop().create_task(
                    self._probe(upstream, wait))

    async def _probe(self, upstream: Upstream, wait: float) -> None:
        """After `wait`, ask a set-aside upstream for the root's NS, with no client waiting: an
        answer of any kind brings it back (with its SRTT), a failure sets it aside for longer
        (and schedules the next probe)."""
        await asyncio.sleep(wait)
        started = self._clock()
        try:
            await self._exchange(upstream, ROOT, TYPE_NS, 1, RD, False)
        except UpstreamError as exc:
            upstream.probe = None
            self._failed(upstream, exc.kind)
            return
        upstream.probe = None
        upstream.failures = 0
        upstream.down_until = 0.0
        upstream.srtt = self._clock() - started

    async def _exchange(self, upstream: Upstream, qname: bytes, qtype: int, qclass: int,
                        flags: int, do: bool) -> UpstreamReply:
        if upstream.address.tls_name:
            data = await self._dot(upstream, qname, qtype, qclass, flags, do)
        else:
            data = await self._udp(upstream, qname, qtype, qclass, flags, do)
        if not upstream.address.tls_name and _HEADER.unpack_from(data)[1] & TC:
            # RFC 7766 §5: a truncated UDP answer is retried over TCP (same question, new ID).
            qid = secrets.randbits(16)
            wire = build_query(qid, flags, qname, qtype, qclass, do)
            data = await self._tcp(upstream, wire, _matcher(qid, qname, qtype, qclass))
        try:
            index = index_response(data)
        except ValueError as exc:
            raise UpstreamError("malformed", str(exc)) from None
        return UpstreamReply(data, index, upstream)

    async def _channel(self, upstream: Upstream) -> _Channel:
        channel = upstream.channel
        if channel is not None and channel.usable():
            return channel
        async with upstream.lock:  # one new socket, however many queries want one now
            channel = upstream.channel
            if channel is not None and channel.usable():
                return channel
            if channel is not None:
                channel.retire()
            address = (upstream.address.host, upstream.address.port)
            try:
                _transport, channel = await asyncio.get_running_loop().create_datagram_endpoint(
                    _Channel, remote_addr=address)
            except OSError as exc:
                raise UpstreamError("unreachable", str(exc)) from None
            upstream.channel = channel
            return channel

    async def _udp(self, upstream: Upstream, qname: bytes, qtype: int, qclass: int,
                   flags: int, do: bool) -> bytes:
        channel = await self._channel(upstream)
        channel.uses += 1
        qid, future = _expect(channel.pending, qname, qtype, qclass)
        try:
            assert channel.transport is not None
            channel.transport.sendto(build_query(qid, flags, qname, qtype, qclass, do))
            async with asyncio.timeout(self.timeout):
                return await future
        except TimeoutError:
            raise UpstreamError("timeout") from None
        finally:
            channel.finished(qid)

    async def _tls_channel(self, upstream: Upstream) -> _TlsChannel:
        channel = upstream.tls
        if channel is not None and not channel.closed:
            return channel
        async with upstream.lock:  # one connection, however many queries want one now
            channel = upstream.tls
            if channel is not None and not channel.closed:
                return channel
            context = self.tls_context or ssl.create_default_context()
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await asyncio.open_connection(
                        upstream.address.host, upstream.address.port, ssl=context,
                        server_hostname=upstream.address.tls_name)
            except TimeoutError:
                raise UpstreamError("timeout", "tls connect") from None
            except ssl.SSLError as exc:  # a wrong name or CA: refused, and said
                raise UpstreamError("tls", exc.reason or str(exc)) from None
            except OSError as exc:
                raise UpstreamError("unreachable", str(exc)) from None
            upstream.tls = channel = _TlsChannel(reader, writer)
            return channel

    async def _dot(self, upstream: Upstream, qname: bytes, qtype: int, qclass: int,
                   flags: int, do: bool) -> bytes:
        channel = await self._tls_channel(upstream)
        qid, future = _expect(channel.pending, qname, qtype, qclass)
        try:
            wire = build_query(qid, flags, qname, qtype, qclass, do)
            channel.writer.write(struct.pack("!H", len(wire)) + wire)
            async with asyncio.timeout(self.timeout):
                return await future
        except TimeoutError:
            raise UpstreamError("timeout", "tls") from None
        finally:
            channel.pending.pop(qid, None)

    def close(self) -> None:
        """Close the upstream sockets (once their queries are done) and stop the probes: a pool
        being replaced, or the daemon stopping."""
        self.closed = True
        for upstream in self.upstreams:
            if upstream.tls is not None:
                upstream.tls.close()
                upstream.tls = None
            if upstream.probe is not None:
                upstream.probe.cancel()
                upstream.probe = None
            if upstream.channel is not None:
                upstream.channel.retire()

    async def _tcp(self, upstream: Upstream, wire: bytes, accept: Callable[[bytes], bool]
                   ) -> bytes:
        writer = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(upstream.address.host,
                                                               upstream.address.port)
                writer.write(struct.pack("!H", len(wire)) + wire)
                length = struct.unpack("!H", await reader.readexactly(2))[0]
                data = await reader.readexactly(length)
        except TimeoutError:
            raise UpstreamError("timeout", "tcp") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError("tcp", str(exc)) from None
        finally:
            if writer is not None:
                writer.close()
        if not accept(data):
            raise UpstreamError("mismatch", "tcp reply does not match the query")
        return data
