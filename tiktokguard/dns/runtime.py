"""What the query path reads that the configuration and the lists decide, as one value.

A reload builds a new `Runtime` (reusing the parts that did not change: the upstream pool keeps its
health, the rate limiter its buckets) and swaps it in with one assignment (`Pipeline.runtime`), so
no query ever sees half of an old configuration and half of a new one, and nothing writes into
the fields of objects it does not own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tiktokguard.dns.answers import BlockAnswers, DdrAnswer
from tiktokguard.dns.cache import MAX_NEGATIVE_TTL, MAX_TTL
from tiktokguard.dns.ratelimit import RateLimiter
from tiktokguard.dns.upstream import UpstreamPool
from tiktokguard.policy.engine import PolicyEngine


@dataclass(frozen=True, slots=True)
class TcpLimits:
    idle_timeout: float = 10.0  # seconds without a complete message (RFC 7766 §6.2.3)
    max_connections: int = 1000  # over all listeners; a newcomer sheds the longest idle
    max_per_client: int = 64  # per client prefix (below)
    prefix_v4: int = 32  # the client prefix a connection counts against, IPv4 ...
    prefix_v6: int = 64  # ... and IPv6 (one host has its /64)


@dataclass(frozen=True, slots=True)
class Runtime:
    engine: PolicyEngine
    blocks: BlockAnswers
    pool: UpstreamPool
    ratelimit: RateLimiter | None = None
    max_ttl: int = MAX_TTL
    max_negative_ttl: int = MAX_NEGATIVE_TTL
    tcp: TcpLimits = TcpLimits()
    # Conditional forwarding: zone (wire form) → its own pool (own health, own SRTTs).
    forward: dict[bytes, UpstreamPool] = field(default_factory=dict)
    ddr: DdrAnswer | None = None  # our encrypted endpoints, when there are any (RFC 9462)

    def pool_for(self, qname: bytes) -> UpstreamPool:
        """The pool of the most specific forward zone that holds qname (wire form, lower
        case), else the default pool. O(labels), on cache misses only."""
        forward = self.forward
        if forward:
            at = 0
            while at < len(qname) - 1:
                pool = forward.get(qname[at:])
                if pool is not None:
                    return pool
                at += qname[at] + 1
        return self.pool

    def pools(self) -> list[UpstreamPool]:
        return [self.pool, *self.forward.values()]


__all__ = ["Runtime", "TcpLimits"]
