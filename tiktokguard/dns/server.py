"""asyncio DNS listeners (UDP and TCP). They only move bytes: policy lives in the pipeline.

TCP follows RFC 7766: 2-byte length framing, several queries per connection answered as they
complete (pipelining, possibly out of order), an idle timeout, and a cap on open connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Coroutine
from typing import Any

from tiktokguard.config import HostPort
from tiktokguard.dns.pipeline import Pipeline
from tiktokguard.policy.clients import client_address

MAX_PIPELINE = 64  # queries in flight on one TCP connection before we stop reading from it
# A burst of queries (a lecture ends, a thousand phones wake up) must wait in the socket, not be
# dropped by it: ask for 4 MiB (the kernel caps it at net.core.rmem_max; the default is ~200 KiB,
# which a burst of ~300 queries fills).
UDP_BUFFER_BYTES = 4 * 1024 * 1024


class ServerState:
    """What the listeners share: the pipeline and the tasks of queries in flight."""

    def __init__(self, pipeline: Pipeline, tcp_idle_timeout: float, max_tcp: int) -> None:
        self.pipeline = pipeline
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp = max_tcp
        self.tcp_connections: set[TcpProtocol] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.servers: list[asyncio.Server] = []
        self.stopping = False

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def stop_accepting(self) -> None:
        """Shutdown, first step: take no new queries, keep the sockets to answer those in
        flight. UDP datagrams are ignored, TCP listeners closed, TCP connections not read."""
        self.stopping = True
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
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.buffer = bytearray()
        self.inflight = 0
        self.paused = False
        self.idle_handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.state.tcp_connections) >= self.state.max_tcp:
            transport.close()  # over the cap: refuse the newcomer, keep serving the others
            return
        self.state.tcp_connections.add(self)
        peer = transport.get_extra_info("peername")
        self.client_ip = client_address(peer[0]) if peer else ""
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.tcp_connections.discard(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        self.transport = None

    def _arm_idle(self) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        self.idle_handle = asyncio.get_running_loop().call_later(
            self.state.tcp_idle_timeout, self._idle)

    def _idle(self) -> None:
        if self.inflight == 0 and self.transport is not None:
            self.transport.close()
        else:
            self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._arm_idle()
        buffer = self.buffer
        while len(buffer) >= 2:
            length = (buffer[0] << 8) | buffer[1]
            if len(buffer) < 2 + length:
                break
            message = bytes(buffer[2:2 + length])
            del buffer[:2 + length]
            self._query(message)
        if self.inflight >= MAX_PIPELINE and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def _query(self, message: bytes) -> None:
        result = self.state.pipeline.handle(message, self.client_ip, "tcp")
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
            if self.paused and self.inflight < MAX_PIPELINE // 2 and self.transport is not None:
                self.transport.resume_reading()
                self.paused = False
        if wire is not None:
            self._send(wire)

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
