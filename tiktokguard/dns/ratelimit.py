"""Per-client rate limiting (docs/design.md §3 `dns.rate_limit_qps`): a token bucket per client
address, IPv6 clients per /56 (one household or one host's privacy addresses share it). Pure: no
I/O, time passed in.

Bounded whatever the traffic: at most `max_clients` buckets, kept in the order they were last
used, so a spoofed flood from many sources evicts the buckets idle longest (which have refilled
anyway, if they were idle for burst/qps seconds) in O(1), and the memo of address → key is
cleared when full.

Over the limit, a query is answered REFUSED, and every second one of that client's TC=1 instead
(the "slip" of Response Rate Limiting, kept per bucket so that interleaved clients each get
theirs): a real client retries over TCP, which a spoofed source cannot, so a legitimate host
behind a flood still gets through.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

MAX_CLIENTS = 100_000
_MEMO_SIZE = 65_536


class RateLimiter:
    def __init__(self, qps: float, burst: float = 0, max_clients: int = MAX_CLIENTS) -> None:
        self.qps = qps
        self.burst = burst if burst > 0 else 2 * qps
        self.max_clients = max_clients
        # key -> [tokens, last refill, slip (0/1)]
        self._buckets: OrderedDict[str | bytes, list[float]] = OrderedDict()
        self._keys: dict[str, str | bytes] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def _key(self, client_ip: str) -> str | bytes:
        key = self._keys.get(client_ip)
        if key is None:
            if ":" in client_ip:
                try:
                    key = ipaddress.IPv6Address(client_ip).packed[:7]  # the /56
                except ValueError:
                    key = client_ip
            else:
                key = client_ip
            if len(self._keys) >= _MEMO_SIZE:
                self._keys.clear()
            self._keys[client_ip] = key
        return key

    def allow(self, client_ip: str, now: float) -> bool:
        """Take one token from this client's bucket; False when it has none."""
        key = self._key(client_ip)
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= self.max_clients:
                buckets.popitem(last=False)  # the bucket idle longest
            buckets[key] = [self.burst - 1, now, 0]
            return True
        buckets.move_to_end(key)
        tokens = bucket[0] + (now - bucket[1]) * self.qps
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1:
            bucket[0] = tokens - 1
            return True
        bucket[0] = tokens
        return False

    def slip(self, client_ip: str) -> bool:
        """True for every second limited query of this client (after allow() said no): answer
        it TC=1 rather than REFUSED."""
        bucket = self._buckets.get(self._key(client_ip))
        if bucket is None:
            return False
        bucket[2] = 1 - bucket[2]
        return bool(bucket[2])
