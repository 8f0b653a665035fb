"""Prometheus metrics of DESIGN §3, on a registry of their own (one per daemon).

Label sets are bounded: transports, decisions, list rules, upstream addresses and error kinds,
never client addresses or query names. Children for fixed labels are bound once so the per-query
cost is one counter increment.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tiktokguard.policy.engine import Verdict

TRANSPORTS = ("udp", "tcp")
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queries = Counter("tiktokguard_dns_queries", "DNS queries by transport and decision",
                               ["transport", "decision"], registry=r)
        self.blocked = Counter("tiktokguard_dns_blocked", "Blocked queries by the matching rule",
                               ["rule"], registry=r)
        self.request_duration = Histogram(
            "tiktokguard_dns_request_duration_seconds",
            "Time from a query's arrival to its answer", buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_duration = Histogram(
            "tiktokguard_upstream_request_duration_seconds", "Upstream exchange time",
            ["upstream"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("tiktokguard_upstream_errors",
                                       "Failed upstream exchanges", ["upstream", "kind"],
                                       registry=r)
        self.cache_hits = Counter("tiktokguard_cache_hits", "Answers served from the cache",
                                  registry=r)
        self.cache_misses = Counter("tiktokguard_cache_misses", "Questions not in the cache",
                                    registry=r)
        self.incidents = Counter("tiktokguard_incidents", "Incidents opened", registry=r)
        self.allowlisted_devices = Gauge("tiktokguard_allowlisted_devices",
                                         "Active, unexpired social media devices", registry=r)
        self.blocklist_rules = Gauge("tiktokguard_blocklist_rules", "Rules in the loaded lists",
                                     registry=r)
        self.malformed = Counter("tiktokguard_malformed_queries",
                                 "Queries dropped or answered with FORMERR/NOTIMP/BADVERS",
                                 ["reason"], registry=r)
        self.list_reload_errors = Counter("tiktokguard_blocklist_reload_errors",
                                          "List reloads that failed (previous lists kept)",
                                          registry=r)
        self.webhook_sent = Counter("tiktokguard_incident_webhook_sent",
                                    "Incidents delivered to the webhook", registry=r)
        self.webhook_dropped = Counter("tiktokguard_incident_webhook_dropped",
                                       "Incidents the webhook never got", ["reason"], registry=r)
        self.neighbour_errors = Counter("tiktokguard_neighbour_table_errors",
                                        "Failed reads of the kernel neighbour table", registry=r)
        # Bound once: the per-query path increments these without a labels() look-up.
        self.query_child = {(t, v): self.queries.labels(t, v.value)
                            for t in TRANSPORTS for v in Verdict}
        self._blocked_child: dict[str, Counter] = {}
        self.malformed_child = {reason: self.malformed.labels(reason)
                                for reason in ("short", "formerr", "notimp", "badvers")}

    def count_blocked(self, rule: str) -> None:
        child = self._blocked_child.get(rule)
        if child is None:
            child = self._blocked_child[rule] = self.blocked.labels(rule)
        child.inc()

    def observe_upstream(self, upstream: str, seconds: float) -> None:
        self.upstream_duration.labels(upstream).observe(seconds)

    def count_upstream_error(self, upstream: str, kind: str) -> None:
        self.upstream_errors.labels(upstream, kind).inc()
