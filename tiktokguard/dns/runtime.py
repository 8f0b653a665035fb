"""What the query path reads that the configuration and the lists decide, as one value.

A reload builds a new `Runtime` (reusing the parts that did not change: the upstream pool keeps its
health, the rate limiter its buckets) and swaps it in with one assignment (`Pipeline.runtime`), so
no query ever sees half of an old configuration and half of a new one, and nothing writes into
the fields of objects it does not own.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiktokguard.dns.answers import BlockAnswers
from tiktokguard.dns.cache import MAX_NEGATIVE_TTL, MAX_TTL
from tiktokguard.dns.ratelimit import RateLimiter
from tiktokguard.dns.upstream import UpstreamPool
from tiktokguard.policy.engine import PolicyEngine


@dataclass(frozen=True, slots=True)
class TcpLimits:
    idle_timeout: float = 10.0  # seconds without a complete message (RFC 7766 §6.2.3)
    max_connections: int = 1000  # over all listeners; a newcomer sheds the longest idle
    max_per_client: int = 64


@dataclass(frozen=True, slots=True)
class Runtime:
    engine: PolicyEngine
    blocks: BlockAnswers
    pool: UpstreamPool
    ratelimit: RateLimiter | None = None
    max_ttl: int = MAX_TTL
    max_negative_ttl: int = MAX_NEGATIVE_TTL
    tcp: TcpLimits = TcpLimits()


__all__ = ["Runtime", "TcpLimits"]
