"""asyncio DNS listeners (UDP and TCP). They only move bytes: policy lives in the pipeline.

TCP follows RFC 7766: 2-byte length framing, several queries per connection answered as they
complete (pipelining, possibly out of order), an idle timeout, and caps on open connections.
One client must not be able to take TCP from everyone else:
- back-pressure: a connection whose answers the client does not read (its output over
  OUTPUT_HIGH bytes) is not read from either until the client catches up, and at most
  MAX_PIPELINE of its queries are in flight; so memory per connection stays bounded;
- the idle timer counts from the last complete query or answer: bytes trickled in without
  completing a message keep no connection open;
- the connection governor (dns/governor.py) admits or refuses a connection at accept:
  `allow_clients`, at most `max_tcp_per_client` connections per client prefix, and when all
  `max_tcp_connections` are taken a newcomer sheds the connection idle the longest;
- a client that half-closes (sends its queries, then FIN) still gets its answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any, cast

from tiktokguard.config import HostPort
from tiktokguard.dns.governor import Governor
from tiktokguard.dns.pipeline import Pipeline
from tiktokguard.policy.clients import client_address

MAX_PIPELINE = 64  # queries in flight on one TCP connection before we stop reading from it
OUTPUT_HIGH = 64 * 1024  # answers waiting for a slow reader before we stop reading its queries
OUTPUT_LOW = 16 * 1024
# Input kept unprocessed at most. While answers wait for a slow reader, reading stops, so what
# is kept is what one read delivered (256 KiB at most with uvloop and asyncio); more means the
# stream is not DNS.
MAX_BUFFERED = 1024 * 1024
# A burst of queries (a lecture ends, a thousand phones wake up) must wait in the socket, not be
# dropped by it: ask for 4 MiB (the kernel caps it at net.core.rmem_max; the default is ~200 KiB,
# which a burst of ~300 queries fills).
UDP_BUFFER_BYTES = 4 * 1024 * 1024


class ServerState:
    """What the listeners share: the pipeline, the connection governor and the tasks of
    queries in flight."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline  # its runtime holds the TCP limits in force (a reload swaps it)
        stats = pipeline.stats
        self.governor = Governor(
            lambda: self.pipeline.runtime.tcp,
            lambda ip: self.pipeline.runtime.engine.classifier.allows(ip),
            stats.connections_refused, stats.connections_closed)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.servers: list[asyncio.Server] = []
        self.stopping = False

    @property
    def tcp_connections(self) -> OrderedDict[Any, None]:
        """The open stream connections, the one idle longest first."""
        return self.governor.connections

    def idle_timeout(self) -> float:
        return self.pipeline.runtime.tcp.idle_timeout

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def admit(self, connection: TcpProtocol) -> bool:
        """Room for a new connection? (dns/governor.py: counted when not.)"""
        return self.governor.refusal(connection) is None

    def release(self, connection: TcpProtocol) -> None:
        self.governor.release(connection)

    def stop_accepting(self) -> None:
        """Shutdown, first step: take no new queries, keep the sockets to answer those in
        flight. UDP datagrams are ignored, TCP listeners closed, TCP connections not read."""
        self.stopping = self.governor.stopping = True
        for server in self.servers:
            server.close()
        for connection in self.tcp_connections:
            if connection.transport is not None:
                connection.transport.pause_reading()

    async def drain(self, seconds: float) -> None:
        """Wait (bounded) for the queries in flight to be answered."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=seconds)


class UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.handle = state.pipeline.handle
        self.transport: asyncio.DatagramTransport | None = None
        self.v6 = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.v6 = sock is not None and sock.family == socket.AF_INET6

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.state.stopping:
            return
        # (only an IPv6 source can carry a scope id: IPv4 needs no normalising)
        result = self.handle(data, client_address(addr[0]) if self.v6 else addr[0], "udp")
        if result is None:
            return
        if isinstance(result, bytes):
            self.transport.sendto(result, addr)  # type: ignore[union-attr]
        else:
            self.state.spawn(self._reply(result, addr))

    async def _reply(self, pending: Coroutine[Any, Any, bytes | None],
                     addr: tuple[Any, ...]) -> None:
        wire = await pending
        transport = self.transport
        if wire is not None and transport is not None and not transport.is_closing():
            transport.sendto(wire, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for a client's address: nothing to do, and no reason to stop


class TcpProtocol(asyncio.Protocol):
    """DNS over TCP (RFC 7766), and over TLS (RFC 7858: the same framing inside TLS; asyncio's
    SSL transport hands over the plaintext, so `label` is all that differs)."""

    def __init__(self, state: ServerState, label: str = "tcp",
                 tls: ssl.SSLContext | None = None, handshake_timeout: float = 10.0) -> None:
        self.state = state
        self.label = label
        self.tls = tls  # DoT: the handshake starts once the governor has admitted the socket
        self.handshake_timeout = handshake_timeout
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.client_key: str | bytes = ""
        self.buffer = bytearray()
        self.inflight = 0
        self.reading = True
        self.writable = True  # False while the client does not read its answers
        self.eof = False  # the client half-closed: answer what is in flight, then close
        self.last_active = 0.0
        self.idle_handle: asyncio.TimerHandle | None = None
        self.handshake: asyncio.Task[None] | None = None
        # DoT between the end of the handshake and start_tls's return: the plaintext that
        # arrives is kept, and answered once the TLS transport is ours.
        self.tls_pending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_ip = client_address(peer[0]) if peer else ""
        if not self.state.admit(self):
            self.transport = None
            transport.close()
            return
        if self.tls is not None:
            # Admitted as a plain socket: only now is a TLS object made, and the handshake
            # has its own deadline (docs/design.md §6).
            plain = cast(asyncio.Transport, transport)
            plain.pause_reading()
            self.tls_pending = True
            # (not among the state's tasks: shutdown need not wait for a handshake)
            self.handshake = asyncio.get_running_loop().create_task(
                self._start_tls(plain, self.tls))
            return
        self._serve(cast(asyncio.Transport, transport))

    async def _start_tls(self, plain: asyncio.Transport, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        governor = self.state.governor
        try:
            wrapped = await loop.start_tls(plain, self, context, server_side=True,
                                           ssl_handshake_timeout=self.handshake_timeout)
        except Exception:  # the deadline, a reset, a client that speaks no TLS
            if self in governor.connections:  # (not shed meanwhile: counted as such)
                late = loop.time() - started >= self.handshake_timeout * 0.99
                governor.closed[(self.label, "handshake_timeout" if late
                                 else "handshake_failed")] += 1
            plain.close()
            self.connection_lost(None)
            return
        if wrapped is None or self not in governor.connections:  # shed or lost meanwhile
            if wrapped is not None:
                wrapped.close()
            return
        self._serve(wrapped)

    def _serve(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.tls_pending = False
        transport.set_write_buffer_limits(high=OUTPUT_HIGH, low=OUTPUT_LOW)
        self.last_active = time.monotonic()
        self.idle_handle = asyncio.get_running_loop().call_later(self.state.idle_timeout(),
                                                                 self._check_idle)
        if self.buffer or self.eof:  # (what arrived right after the handshake)
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.release(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _active(self) -> None:
        """A complete query arrived, or an answer that had to wait for an upstream left: the
        idle timer starts again, and this connection moves to the back of the shedding order.
        (An answer given at once needs no second call: its query just made one.)"""
        self.last_active = time.monotonic()  # (the clock of loop.time(), in asyncio and uvloop)
        self.state.governor.touch(self)

    def _check_idle(self) -> None:
        """RFC 7766 §6.2.3: close a connection idle for the timeout; one with queries in
        flight waits for them. (One timer a connection, re-armed for what is left of the
        timeout: cheaper than a new timer per message.)"""
        if self.transport is None:
            return
        timeout = self.state.idle_timeout()
        left = self.last_active + timeout - time.monotonic()
        if left <= 0 and self.inflight == 0:
            self.state.governor.closed[(self.label, "idle")] += 1
            self.transport.close()
            return
        self.idle_handle = asyncio.get_running_loop().call_later(max(left, timeout / 4),
                                                                 self._check_idle)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._process()
        if len(self.buffer) > MAX_BUFFERED:
            self.close()

    def _process(self) -> None:
        """Answer the complete frames in the buffer while the client reads its answers and
        the pipeline has room; then read more, or stop reading until it does."""
        if self.tls_pending:
            return
        buffer = self.buffer
        while (self.writable and self.inflight < MAX_PIPELINE and len(buffer) >= 2
               and self.transport is not None):
            length = (buffer[0] << 8) | buffer[1]
            if len(buffer) < 2 + length:
                break
            message = bytes(buffer[2:2 + length])
            del buffer[:2 + length]
            self._active()
            self._query(message)
        self._set_reading(self.writable and self.inflight < MAX_PIPELINE)
        if self.eof and self.inflight == 0 and self.transport is not None:
            self.transport.close()  # half-closed, and everything asked is answered

    def _set_reading(self, reading: bool) -> None:
        transport = self.transport
        if transport is None or reading == self.reading or self.state.stopping:
            return
        self.reading = reading
        if reading:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def pause_writing(self) -> None:
        self.writable = False
        self._set_reading(False)

    def resume_writing(self) -> None:
        self.writable = True
        self._process()

    def eof_received(self) -> bool:
        """The client half-closed: keep the connection to send the answers still owed
        (RFC 7766 §6.2.4 lets a client send its queries and then close its side)."""
        self.eof = True
        if self.inflight == 0 and len(self.buffer) < 2:
            return False  # nothing owed: let the transport close
        self._process()
        return True

    def _query(self, message: bytes) -> None:
        result = self.state.pipeline.handle(message, self.client_ip, self.label)
        if result is None:
            if len(message) < 12 and self.transport is not None:
                # RFC 7766 §8: a malformed frame leaves the stream in doubt; close it.
                self.transport.close()
            return
        if isinstance(result, bytes):
            self._send(result)
        else:
            self.inflight += 1
            self.state.spawn(self._reply(result))

    async def _reply(self, pending: Coroutine[Any, Any, bytes | None]) -> None:
        try:
            wire = await pending
        finally:
            self.inflight -= 1
        if wire is not None:
            self._send(wire)
            self._active()  # an answer after the upstream's round trip: idle time starts now
        self._process()

    def _send(self, wire: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(struct.pack("!H", len(wire)) + wire)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _udp_socket(address: HostPort, reuse_port: bool = False) -> socket.socket:
    """A bound UDP socket; an IPv6 one is IPv6-only (as asyncio makes TCP ones), so that
    "0.0.0.0:53" and "[::]:53" can both be listed."""
    family = _family(address.host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER_BYTES)
        sock.bind((address.host, address.port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_tls_listeners(state: ServerState, listen: tuple[HostPort, ...],
                              context: ssl.SSLContext, handshake_timeout: float
                              ) -> list[asyncio.Server]:
    """DNS over TLS on every address (RFC 7858). Each socket is accepted as plain TCP and put
    to the governor first; an admitted one that does not finish its handshake within
    handshake_timeout is dropped. Raises OSError naming the address."""
    loop = asyncio.get_running_loop()
    opened: list[asyncio.Server] = []
    try:
        for address in listen:
            try:
                server = await loop.create_server(
                    lambda: TcpProtocol(state, "dot", context, handshake_timeout),
                    address.host, address.port, family=_family(address.host),
                    reuse_address=True, backlog=1024)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address} (tls): "
                                         f"{exc.strerror}") from None
            opened.append(server)
            state.servers.append(server)
    except BaseException:
        for item in opened:
            item.close()
        raise
    return opened


async def start_listeners(state: ServerState, listen: tuple[HostPort, ...],
                          reuse_port: bool = False
                          ) -> list[asyncio.BaseTransport | asyncio.Server]:
    """Bind UDP and TCP on every address; raises OSError naming the address on failure.
    reuse_port: several processes share the addresses and the kernel spreads the load."""
    loop = asyncio.get_running_loop()
    opened: list[asyncio.BaseTransport | asyncio.Server] = []
    try:
        for address in listen:
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: UdpProtocol(state), sock=_udp_socket(address, reuse_port))
                opened.append(udp)
                tcp = await loop.create_server(
                    lambda: TcpProtocol(state), address.host, address.port,
                    family=_family(address.host), reuse_address=True, backlog=1024,
                    reuse_port=reuse_port)
                opened.append(tcp)
                state.servers.append(tcp)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    except BaseException:
        for item in opened:
            item.close()
        raise
    return opened
