"""Prometheus metrics of docs/design.md §3, on a registry of their own (one per daemon).

Label sets are bounded: transports, decisions, list rules, upstream addresses and error kinds,
never client addresses or query names.

The DNS path's counters (queries by transport and decision, blocked by rule, cache hits and
misses, malformed queries, answer and upstream times, upstream errors) are plain numbers in
`QueryStats`,
exported by a collector when Prometheus scrapes: prometheus-client's own counters take a lock
per increment, which measured at ~1 µs each and made up a third of the per-query cost (see
bench/README.md). Everything off the per-query path uses prometheus-client's metric types.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tiktokguard import __version__
from tiktokguard.policy.engine import Verdict

TRANSPORTS = ("udp", "tcp", "dot", "doh")
# Every value a labelled counter can take is exported from the start at 0, so that the first
# event shows in increase()/rate() (a series born at its full count shows nothing).
UPSTREAM_ERROR_KINDS = ("timeout", "unreachable", "tcp", "tls", "mismatch", "malformed",
                        "servfail", "refused")
WEBHOOK_DROP_REASONS = ("queue_full", "unreachable", "http_4xx", "http_5xx")
MALFORMED_REASONS = ("short", "formerr", "notimp", "badvers")
NETFILTER_EVENTS = ("added", "refreshed", "expired", "errors", "shadow_resolved",
                    "shadow_skipped")
STREAM_TRANSPORTS = ("tcp", "dot", "doh")
REFUSAL_REASONS = ("stopping", "not_allowed", "per_client", "full")  # dns/governor.py
# Why the daemon closed an admitted connection: shed for a newcomer, a deadline, a failed handshake.
CLOSE_REASONS = ("shed", "idle", "handshake_timeout", "handshake_failed")
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)


class QueryStats(Collector):
    """The DNS path's counters as plain numbers (the event loop is their only writer).

    With `dns.workers` > 1 each process has one; workers send snapshots to the main process,
    which exports the sum (`merged`)."""

    def __init__(self) -> None:
        self.queries: dict[tuple[str, str], int] = {
            (t, v): 0 for t in TRANSPORTS for v in (*Verdict.ALL, Verdict.MALFORMED)}
        self.blocked: dict[str, int] = {}
        self.malformed: dict[str, int] = dict.fromkeys(MALFORMED_REASONS, 0)
        self.cache_hits = 0
        self.cache_misses = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.upstream_latency: dict[str, list[int]] = {}
        self.upstream_latency_sum: dict[str, float] = {}
        self.upstream_errors: dict[tuple[str, str], int] = {}
        # The last 8 exchanges per upstream as bits (1: a usable answer), for the `up` gauge.
        self.upstream_recent: dict[str, int] = {}
        self.neighbour_errors = 0
        self.rate_limited = 0
        self.stale_answers = 0
        self.netfilter: dict[str, int] = dict.fromkeys(NETFILTER_EVENTS, 0)
        # Stream connections (TCP, DoT, DoH) refused at accept and closed by the daemon, by
        # (transport, reason); dns/governor.py counts them.
        self.connections_refused: dict[tuple[str, str], int] = {
            (t, r): 0 for t in STREAM_TRANSPORTS for r in REFUSAL_REASONS}
        self.connections_closed: dict[tuple[str, str], int] = {
            (t, r): 0 for t in STREAM_TRANSPORTS for r in CLOSE_REASONS}
        self.others: list[QueryStats] = []  # the workers' latest snapshots (main process)

    def observe(self, seconds: float) -> None:
        self.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def observe_upstream(self, upstream: str, seconds: float) -> None:
        """A usable answer, and how long it took."""
        self.upstream_recent[upstream] = ((self.upstream_recent.get(upstream, 0xFF) << 1)
                                          | 1) & 0xFF
        counts = self.upstream_latency.get(upstream)
        if counts is None:
            counts = self.upstream_latency[upstream] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.upstream_latency_sum[upstream] = 0.0
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.upstream_latency_sum[upstream] += seconds

    def declare_rules(self, rules: Iterable[str]) -> None:
        """Every rule in force has its `blocked{rule}` series from the start, at 0. Rules of
        earlier lists stay (a counter must not vanish on a reload)."""
        blocked = self.blocked
        for rule in rules:
            if rule not in blocked:
                blocked[rule] = 0

    def declare_upstreams(self, upstreams: Iterable[str]) -> None:
        """Each upstream's error kinds and latency histogram, at 0 from the start."""
        for name in upstreams:
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.setdefault((name, kind), 0)
            self.upstream_recent.setdefault(name, 0xFF)
            if name not in self.upstream_latency:
                self.upstream_latency[name] = [0] * (len(LATENCY_BUCKETS) + 1)
                self.upstream_latency_sum[name] = 0.0

    def count_upstream_error(self, upstream: str, kind: str) -> None:
        """A failed exchange, or an answer that was no use (SERVFAIL, REFUSED)."""
        self.upstream_recent[upstream] = (self.upstream_recent.get(upstream, 0xFF) << 1) & 0xFF
        key = (upstream, kind)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain data (to send between processes)."""
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> QueryStats:
        stats = cls()
        for name in _FIELDS:
            setattr(stats, name, data[name])
        return stats

    def absorb(self, other: QueryStats) -> None:
        """Add another process's final counts to this one for good (a worker that died)."""
        _add(self, other)

    def merged(self) -> QueryStats:
        """This process's counts plus the workers' latest snapshots."""
        if not self.others:
            return self
        total = QueryStats.from_snapshot(copy.deepcopy(self.snapshot()))
        for other in self.others:
            _add(total, other)
        return total

    def collect(self) -> Iterator[Metric]:
        stats = self.merged()
        queries = CounterMetricFamily("tiktokguard_dns_queries", "DNS queries by transport and "
                                      "decision", labels=["transport", "decision"])
        for (transport, verdict), n in stats.queries.items():
            if verdict != Verdict.MALFORMED:
                queries.add_metric([transport, verdict], n)
        yield queries
        blocked = CounterMetricFamily("tiktokguard_dns_blocked",
                                      "Blocked queries by the matching rule", labels=["rule"])
        for rule, n in sorted(stats.blocked.items()):
            blocked.add_metric([rule], n)
        yield blocked
        malformed = CounterMetricFamily("tiktokguard_malformed_queries",
                                        "Queries dropped or answered with FORMERR/NOTIMP/BADVERS",
                                        labels=["reason"])
        for reason, n in stats.malformed.items():
            malformed.add_metric([reason], n)
        yield malformed
        yield CounterMetricFamily("tiktokguard_cache_hits", "Answers served from the cache",
                                  value=stats.cache_hits)
        yield CounterMetricFamily("tiktokguard_cache_misses", "Questions not in the cache",
                                  value=stats.cache_misses)
        yield HistogramMetricFamily("tiktokguard_dns_request_duration_seconds",
                                    "Time from a query's arrival to its answer",
                                    buckets=_buckets(stats.latency), sum_value=stats.latency_sum)
        upstream = HistogramMetricFamily("tiktokguard_upstream_request_duration_seconds",
                                         "Upstream exchange time", labels=["upstream"])
        for name, counts in sorted(stats.upstream_latency.items()):
            upstream.add_metric([name], _buckets(counts), stats.upstream_latency_sum[name])
        yield upstream
        up = GaugeMetricFamily("tiktokguard_upstream_up", "1 when at least one of the upstream's "
                               "last 8 exchanges gave a usable answer (not a timeout, network "
                               "error, REFUSED or SERVFAIL)", labels=["upstream"])
        for name, recent in sorted(stats.upstream_recent.items()):
            up.add_metric([name], 1 if recent else 0)
        yield up
        errors = CounterMetricFamily("tiktokguard_upstream_errors", "Failed upstream exchanges",
                                     labels=["upstream", "kind"])
        for (name, kind), n in sorted(stats.upstream_errors.items()):
            errors.add_metric([name, kind], n)
        yield errors
        yield CounterMetricFamily("tiktokguard_dns_rate_limited",
                                  "UDP queries over their client's rate limit (answered REFUSED, "
                                  "or TC=1 every second one)", value=stats.rate_limited)
        yield CounterMetricFamily("tiktokguard_dns_stale_answers",
                                  "Expired answers served while every upstream failed "
                                  "(RFC 8767 serve-stale, TTL 30 s)", value=stats.stale_answers)
        yield CounterMetricFamily("tiktokguard_neighbour_table_errors",
                                  "Failed reads of the kernel neighbour table",
                                  value=stats.neighbour_errors)
        nf = stats.netfilter
        yield CounterMetricFamily("tiktokguard_netfilter_entries_added",
                                  "Addresses put into the kernel sets", value=nf["added"])
        yield CounterMetricFamily("tiktokguard_netfilter_entries_refreshed",
                                  "Kernel set entries given a new timeout", value=nf["refreshed"])
        yield CounterMetricFamily("tiktokguard_netfilter_entries_expired",
                                  "Kernel set entries whose timeout has passed",
                                  value=nf["expired"])
        yield CounterMetricFamily("tiktokguard_netfilter_errors",
                                  "Failed kernel set writes (netlink)", value=nf["errors"])
        shadow = CounterMetricFamily("tiktokguard_netfilter_shadow_queries",
                                     "Shadow resolutions of blocked names", labels=["result"])
        shadow.add_metric(["resolved"], nf["shadow_resolved"])
        shadow.add_metric(["skipped"], nf["shadow_skipped"])
        yield shadow
        refused = CounterMetricFamily(
            "tiktokguard_stream_connections_refused", "Stream connections refused by the "
            "connection governor (closed at once), by reason", labels=["transport", "reason"])
        for (transport, reason), n in stats.connections_refused.items():
            refused.add_metric([transport, reason], n)
        yield refused
        closed = CounterMetricFamily(
            "tiktokguard_stream_connections_closed", "Admitted stream connections the "
            "daemon closed: shed for a newcomer, a deadline passed, or its TLS handshake "
            "failed", labels=["transport", "reason"])
        for (transport, reason), n in stats.connections_closed.items():
            closed.add_metric([transport, reason], n)
        yield closed

    def describe(self) -> Iterator[Metric]:
        return self.collect()


_FIELDS = ("queries", "blocked", "malformed", "cache_hits", "cache_misses", "latency",
           "latency_sum", "upstream_latency", "upstream_latency_sum", "upstream_errors",
           "upstream_recent",
           "neighbour_errors", "rate_limited", "stale_answers", "netfilter", "connections_refused",
           "connections_closed")


def _add(total: QueryStats, other: QueryStats) -> None:
    for attr in ("queries", "blocked", "malformed", "upstream_errors", "upstream_latency_sum",
                 "netfilter", "connections_refused", "connections_closed"):
        mine, theirs = getattr(total, attr), getattr(other, attr)
        for key, n in theirs.items():
            mine[key] = mine.get(key, 0) + n
    for name, counts in other.upstream_latency.items():
        mine_counts = total.upstream_latency.setdefault(name, [0] * len(counts))
        for i, n in enumerate(counts):
            mine_counts[i] += n
    for i, n in enumerate(other.latency):
        total.latency[i] += n
    total.latency_sum += other.latency_sum
    for name, recent in other.upstream_recent.items():  # up where any process sees it up
        total.upstream_recent[name] = total.upstream_recent.get(name, 0) | recent
    total.cache_hits += other.cache_hits
    total.cache_misses += other.cache_misses
    total.neighbour_errors += other.neighbour_errors
    total.rate_limited += other.rate_limited
    total.stale_answers += other.stale_answers


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    cumulative = 0
    out: list[tuple[str, float]] = []
    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
        cumulative += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return out


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.stats = QueryStats()
        r.register(self.stats)
        self.incidents = Counter("tiktokguard_incidents", "Incidents opened", registry=r)
        self.api_connections_refused = Counter(
            "tiktokguard_api_connections_refused", "HTTP connections closed at once: the API "
            "had its maximum open", registry=r)
        self.http_malformed = Counter(
            "tiktokguard_http_malformed_requests", "HTTP requests that could not be read (a "
            "bad request line or header): answered 400, the connection closed", ["listener"],
            registry=r)
        for listener in ("api", "doh"):
            self.http_malformed.labels(listener)
        self.incidents_overflow = Counter(
            "tiktokguard_incidents_overflow", "Blocked queries of a new (client, rule) that found "
            "the open-incident table full (summed into incident_storm events)", registry=r)
        self.allowlisted_devices = Gauge("tiktokguard_allowlisted_devices",
                                         "Active, unexpired social media devices", registry=r)
        self.blocklist_rules = Gauge("tiktokguard_blocklist_rules", "Rules in the loaded lists",
                                     registry=r)
        self.netfilter_entries = Gauge("tiktokguard_netfilter_set_entries",
                                       "Addresses in the kernel sets (written by this process)",
                                       registry=r)
        self.netfilter_exempt_entries = Gauge(
            "tiktokguard_netfilter_exempt_entries",
            "Networks and MACs of allowlisted devices in the exemption sets", registry=r)
        self.list_reload_errors = Counter("tiktokguard_blocklist_reload_errors",
                                          "List reloads that failed (previous lists kept)",
                                          registry=r)
        self.api_auth_failures = Counter(
            "tiktokguard_api_auth_failures", "API requests with no token or an unknown one "
            "(each logged as api_auth_failed with the client's address)", registry=r)
        self.build_info = Info("tiktokguard_build", "The running version", registry=r)
        self.build_info.info({"version": __version__})
        self.store_up = Gauge("tiktokguard_store_up", "1 while the device store answers (0: a "
                              "shared database is unreachable, DNS decides from the last known "
                              "devices)", registry=r)
        self.list_fetch_errors = Counter("tiktokguard_blocklist_fetch_errors",
                                         "Failed fetches of URL lists (the last good copy "
                                         "stays in force)", ["list"], registry=r)
        self.list_skipped_lines = Gauge("tiktokguard_blocklist_skipped_lines",
                                        "Lines of a list skipped at its last load (modifiers, "
                                        "or lines of a URL list that do not parse)", ["list"],
                                        registry=r)
        self.webhook_sent = Counter("tiktokguard_incident_webhook_sent",
                                    "Incidents delivered to the webhook", registry=r)
        self.webhook_dropped = Counter("tiktokguard_incident_webhook_dropped",
                                       "Incidents the webhook never got", ["reason"], registry=r)
        for reason in WEBHOOK_DROP_REASONS:
            self.webhook_dropped.labels(reason)

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when absent): for tests and the CLI."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value
