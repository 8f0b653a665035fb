"""Prometheus metrics of DESIGN §3, on a registry of their own (one per daemon).

Label sets are bounded: transports, decisions, list rules, upstream addresses and error kinds,
never client addresses or query names.

The per-query counters (queries by transport and decision, blocked by rule, cache hits and
misses, malformed queries, the answer-time histogram) are plain integers in `QueryStats`,
exported by a collector when Prometheus scrapes: prometheus-client's own counters take a lock
per increment, which measured at ~1 µs each and made up a third of the per-query cost (see
bench/README.md). Everything off the per-query path uses prometheus-client's metric types.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tiktokguard.policy.engine import Verdict

TRANSPORTS = ("udp", "tcp")
MALFORMED_REASONS = ("short", "formerr", "notimp", "badvers")
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)


class QueryStats(Collector):
    """Per-query counters as plain ints (the event loop is their only writer)."""

    def __init__(self) -> None:
        self.queries: dict[tuple[str, str], int] = {
            (t, v): 0 for t in TRANSPORTS for v in Verdict.ALL}
        self.blocked: dict[str, int] = {}
        self.malformed: dict[str, int] = dict.fromkeys(MALFORMED_REASONS, 0)
        self.cache_hits = 0
        self.cache_misses = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def merge(self, other: QueryStats) -> None:
        """Add another process's counts (dns.workers > 1)."""
        for key, n in other.queries.items():
            self.queries[key] = self.queries.get(key, 0) + n
        for rule, n in other.blocked.items():
            self.blocked[rule] = self.blocked.get(rule, 0) + n
        for reason, n in other.malformed.items():
            self.malformed[reason] = self.malformed.get(reason, 0) + n
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        for i, n in enumerate(other.latency_counts):
            self.latency_counts[i] += n
        self.latency_sum += other.latency_sum

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        queries = CounterMetricFamily("tiktokguard_dns_queries", "DNS queries by transport and "
                                      "decision", labels=["transport", "decision"])
        for (transport, verdict), n in self.queries.items():
            queries.add_metric([transport, verdict], n)
        yield queries
        blocked = CounterMetricFamily("tiktokguard_dns_blocked",
                                      "Blocked queries by the matching rule", labels=["rule"])
        for rule, n in sorted(self.blocked.items()):
            blocked.add_metric([rule], n)
        yield blocked
        malformed = CounterMetricFamily("tiktokguard_malformed_queries",
                                        "Queries dropped or answered with FORMERR/NOTIMP/BADVERS",
                                        labels=["reason"])
        for reason, n in self.malformed.items():
            malformed.add_metric([reason], n)
        yield malformed
        yield CounterMetricFamily("tiktokguard_cache_hits", "Answers served from the cache",
                                  value=self.cache_hits)
        yield CounterMetricFamily("tiktokguard_cache_misses", "Questions not in the cache",
                                  value=self.cache_misses)
        cumulative, buckets = 0, []
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.latency_counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily("tiktokguard_dns_request_duration_seconds",
                                    "Time from a query's arrival to its answer",
                                    buckets=buckets, sum_value=self.latency_sum)

    def describe(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        return self.collect()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.stats = QueryStats()
        r.register(self.stats)
        self.upstream_duration = Histogram(
            "tiktokguard_upstream_request_duration_seconds", "Upstream exchange time",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("tiktokguard_upstream_errors",
                                       "Failed upstream exchanges", ["upstream", "kind"],
                                       registry=r)
        self.incidents = Counter("tiktokguard_incidents", "Incidents opened", registry=r)
        self.allowlisted_devices = Gauge("tiktokguard_allowlisted_devices",
                                         "Active, unexpired social media devices", registry=r)
        self.blocklist_rules = Gauge("tiktokguard_blocklist_rules", "Rules in the loaded lists",
                                     registry=r)
        self.list_reload_errors = Counter("tiktokguard_blocklist_reload_errors",
                                          "List reloads that failed (previous lists kept)",
                                          registry=r)
        self.webhook_sent = Counter("tiktokguard_incident_webhook_sent",
                                    "Incidents delivered to the webhook", registry=r)
        self.webhook_dropped = Counter("tiktokguard_incident_webhook_dropped",
                                       "Incidents the webhook never got", ["reason"], registry=r)
        self.neighbour_errors = Counter("tiktokguard_neighbour_table_errors",
                                        "Failed reads of the kernel neighbour table", registry=r)

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when absent): for tests and the CLI."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def observe_upstream(self, upstream: str, seconds: float) -> None:
        self.upstream_duration.labels(upstream).observe(seconds)

    def count_upstream_error(self, upstream: str, kind: str) -> None:
        self.upstream_errors.labels(upstream, kind).inc()
