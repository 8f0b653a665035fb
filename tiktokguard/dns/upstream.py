"""Upstream pool: forward a question to the upstream resolvers, with timeouts and failover.

Each upstream query gets a fresh random ID and a fresh socket (so a fresh random source port from
the kernel), and a reply is accepted only when it comes from the upstream's address (connected
socket) with our ID and our question: the defences against off-path spoofing (RFC 5452 §9).
Upstreams are tried in order of health; a truncated UDP reply is retried over TCP.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from tiktokguard.config import HostPort
from tiktokguard.dns.wire import (
    QR,
    REFUSED,
    SERVFAIL,
    TC,
    RecordIndex,
    build_query,
    index_response,
)

_HEADER = struct.Struct("!HHHHHH")
FAILURES_BEFORE_DOWN = 3
DOWN_SECONDS = (5.0, 60.0)  # first and longest back-off of an upstream that keeps failing


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
    failures: int = 0  # consecutive
    down_until: float = 0.0
    last_success: float = 0.0
    last_failure: float = 0.0

    @property
    def name(self) -> str:
        return str(self.address)


@dataclass(slots=True)
class UpstreamReply:
    wire: bytes
    index: RecordIndex
    upstream: Upstream


Observer = Callable[[str, float], None]
ErrorCounter = Callable[[str, str], None]


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, future: asyncio.Future[bytes], accept: Callable[[bytes], bool]) -> None:
        self.future = future
        self.accept = accept

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.future.done() and self.accept(data):
            self.future.set_result(data)
        # anything else (wrong ID, wrong question) is ignored: a spoofing attempt or a late reply

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(UpstreamError("unreachable", str(exc)))


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


class UpstreamPool:
    def __init__(self, upstreams: tuple[HostPort, ...], timeout: float,
                 observe: Observer | None = None, count_error: ErrorCounter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.upstreams = [Upstream(u) for u in upstreams]
        self.timeout = timeout
        self._observe = observe or (lambda name, seconds: None)
        self._count_error = count_error or (lambda name, kind: None)
        self._clock = clock
        self._inflight: dict[tuple[bytes, int, int, int, bool], asyncio.Future[UpstreamReply]] = {}

    def ordered(self, now: float) -> list[Upstream]:
        """Healthy upstreams in configured order, then those backing off (soonest back first)."""
        healthy = [u for u in self.upstreams if u.down_until <= now]
        resting = sorted((u for u in self.upstreams if u.down_until > now),
                         key=lambda u: u.down_until)
        return healthy + resting

    def failing_since(self, now: float, window: float) -> bool:
        """True when upstream exchanges have failed and none succeeded for `window` seconds:
        all upstreams are down, as far as the queries tell (no probes are sent)."""
        success = max((u.last_success for u in self.upstreams), default=0.0)
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
        last: Exception | None = None
        for upstream in self.ordered(self._clock()):
            started = self._clock()
            try:
                reply = await self._exchange(upstream, qname, qtype, qclass, flags, do)
            except UpstreamError as exc:
                self._failed(upstream, exc.kind)
                last = exc
                continue
            now = self._clock()
            self._observe(upstream.name, now - started)
            if reply.index.rcode in (SERVFAIL, REFUSED):
                # This upstream could not answer; another may (failover on SERVFAIL, DESIGN §3).
                self._failed(upstream, "servfail" if reply.index.rcode == SERVFAIL else "refused")
                last = UpstreamError("servfail")
                continue
            upstream.failures = 0
            upstream.down_until = 0.0
            upstream.last_success = now
            return reply
        raise AllUpstreamsFailed(str(last) if last else "no upstreams configured")

    def _failed(self, upstream: Upstream, kind: str) -> None:
        self._count_error(upstream.name, kind)
        upstream.last_failure = self._clock()
        upstream.failures += 1
        if upstream.failures >= FAILURES_BEFORE_DOWN:
            first, longest = DOWN_SECONDS
            backoff = min(longest, first * 2 ** (upstream.failures - FAILURES_BEFORE_DOWN))
            upstream.down_until = self._clock() + backoff

    async def _exchange(self, upstream: Upstream, qname: bytes, qtype: int, qclass: int,
                        flags: int, do: bool) -> UpstreamReply:
        qid = secrets.randbits(16)
        wire = build_query(qid, flags, qname, qtype, qclass, do)
        accept = _matcher(qid, qname, qtype, qclass)
        data = await self._udp(upstream, wire, accept)
        if _HEADER.unpack_from(data)[1] & TC:
            # RFC 7766 §5: a truncated UDP answer is retried over TCP (same question, new ID).
            qid = secrets.randbits(16)
            wire = build_query(qid, flags, qname, qtype, qclass, do)
            data = await self._tcp(upstream, wire, _matcher(qid, qname, qtype, qclass))
        try:
            index = index_response(data)
        except ValueError as exc:
            raise UpstreamError("malformed", str(exc)) from None
        return UpstreamReply(data, index, upstream)

    async def _udp(self, upstream: Upstream, wire: bytes, accept: Callable[[bytes], bool]
                   ) -> bytes:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        address = (upstream.address.host, upstream.address.port)
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Receiver(future, accept), remote_addr=address)
        except OSError as exc:
            raise UpstreamError("unreachable", str(exc)) from None
        try:
            transport.sendto(wire)
            async with asyncio.timeout(self.timeout):
                return await future
        except TimeoutError:
            raise UpstreamError("timeout") from None
        finally:
            transport.close()

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
