"""The connection governor: one set of bounds for every stream listener (TCP, DoT, DoH),
applied when a connection is accepted, before the first byte of it is read
(docs/design.md, "One governor for every stream listener").

A newcomer is refused, in this order, when
- the daemon is shutting down (`stopping`);
- its address is outside `dns.allow_clients` (`not_allowed`);
- its client prefix (`dns.tcp_client_prefix_v4`/`_v6`: /32 and /64 by default, so one IPv6
  host cannot take the slots with the 2^64 addresses of its subnet) holds
  `max_tcp_per_client` connections (`per_client`);
- every one of `max_tcp_connections` is taken and none is idle to be shed (`full`).
When every slot is taken, the connection idle longest (no query in flight) is shed to make room,
whatever listener it arrived on.

Pure bookkeeping, no sockets: the listeners call it on the DNS loop, and it closes what it
sheds through the connection's own `close()`. O(1) per connection: the shedding order is an
OrderedDict, and the client prefixes of recent addresses are memoised (bounded).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from tiktokguard.dns.runtime import TcpLimits
from tiktokguard.metrics import CLOSE_REASONS, REFUSAL_REASONS, STREAM_TRANSPORTS

_MEMO_SIZE = 65_536


class Governed(Protocol):
    """What the governor needs of a connection."""

    label: str  # its transport: tcp, dot, doh
    client_ip: str
    client_key: str | bytes  # set by the governor at admission
    inflight: int  # its queries being answered (0: idle, may be shed)

    def close(self) -> None: ...


class Governor:
    def __init__(self, limits: Callable[[], TcpLimits], allowed: Callable[[str], bool],
                 refused: dict[tuple[str, str], int] | None = None,
                 closed: dict[tuple[str, str], int] | None = None) -> None:
        self.limits = limits  # the numbers in force (a reload swaps the runtime that holds them)
        self.allowed = allowed
        # Open connections, the one idle longest first (moved to the end on activity).
        self.connections: OrderedDict[Governed, None] = OrderedDict()
        self.per_client: dict[str | bytes, int] = {}
        # The counters (the metrics' own dicts, so that they are exported as they are).
        self.refused = refused if refused is not None else {}
        self.closed = closed if closed is not None else {}
        for transport in STREAM_TRANSPORTS:
            for reason in REFUSAL_REASONS:
                self.refused.setdefault((transport, reason), 0)
            for reason in CLOSE_REASONS:
                self.closed.setdefault((transport, reason), 0)
        self.stopping = False
        self._keys: dict[str, str | bytes] = {}
        self._prefixes = (32, 64)

    def key(self, client_ip: str) -> str | bytes:
        """The client prefix a connection counts against: the address itself for a /32 (or
        /128), else the packed network and its length."""
        limits = self.limits()
        prefixes = (limits.prefix_v4, limits.prefix_v6)
        if prefixes != self._prefixes:  # a reload changed them: count the open ones anew
            self._prefixes = prefixes
            self._keys.clear()
            self.per_client.clear()
            for connection in self.connections:
                connection.client_key = prefix_key(connection.client_ip, *prefixes)
                self.per_client[connection.client_key] = (
                    self.per_client.get(connection.client_key, 0) + 1)
        key = self._keys.get(client_ip)
        if key is None:
            key = prefix_key(client_ip, *prefixes)
            if len(self._keys) >= _MEMO_SIZE:
                self._keys.clear()
            self._keys[client_ip] = key
        return key

    def refusal(self, connection: Governed) -> str | None:
        """Admit the connection (None) or say why not; a refusal is counted. Sheds the
        longest-idle connection when every slot is taken."""
        reason = self._refusal(connection)
        if reason is not None:
            self.refused[(connection.label, reason)] += 1
        return reason

    def _refusal(self, connection: Governed) -> str | None:
        if self.stopping:
            return "stopping"
        client = connection.client_ip
        if not self.allowed(client):
            return "not_allowed"
        limits = self.limits()
        key = connection.client_key = self.key(client)
        if self.per_client.get(key, 0) >= limits.max_per_client:
            return "per_client"
        if len(self.connections) >= limits.max_connections:
            for other in self.connections:  # longest idle first
                if other.inflight == 0:
                    self.release(other)
                    other.close()
                    self.closed[(other.label, "shed")] += 1
                    break
            else:
                return "full"
        self.connections[connection] = None
        self.per_client[key] = self.per_client.get(key, 0) + 1
        return None

    def touch(self, connection: Governed) -> None:
        """A query arrived or was answered: the connection goes to the back of the shedding
        order."""
        connections = self.connections
        if connection in connections:
            connections.move_to_end(connection)

    def release(self, connection: Governed) -> None:
        """The connection is gone (or being shed); a second call does nothing."""
        if self.connections.pop(connection, False) is None:
            key = connection.client_key
            left = self.per_client.get(key, 1) - 1
            if left:
                self.per_client[key] = left
            else:
                self.per_client.pop(key, None)

    def __len__(self) -> int:
        return len(self.connections)


def prefix_key(client_ip: str, prefix_v4: int, prefix_v6: int) -> str | bytes:
    """The key of client_ip's prefix: the address for a full-length prefix, else the packed
    network address and the prefix length."""
    v6 = ":" in client_ip
    bits = prefix_v6 if v6 else prefix_v4
    if bits == (128 if v6 else 32):
        return client_ip
    try:
        network = ipaddress.ip_network(f"{client_ip}/{bits}", strict=False)
    except ValueError:
        return client_ip
    return network.network_address.packed + bytes((bits,))


__all__ = ["Governed", "Governor", "prefix_key"]
