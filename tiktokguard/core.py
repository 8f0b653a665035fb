"""The DNS side of one process: policy engine, cache, upstreams, query pipeline and listeners.

The daemon's main process has one (plus the control plane: API, store, incidents, sd_notify);
each extra worker process (`dns.workers` > 1) has one and nothing else. Both apply config and list
reloads through the same methods here, so a worker can never drift from the main process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tiktokguard.config import Config, PolicyConfig
from tiktokguard.dns.answers import BlockAnswers
from tiktokguard.dns.cache import AnswerCache
from tiktokguard.dns.pipeline import IncidentSink, MacSource, Pipeline
from tiktokguard.dns.ratelimit import RateLimiter
from tiktokguard.dns.server import ServerState, start_listeners
from tiktokguard.dns.upstream import UpstreamPool
from tiktokguard.metrics import Metrics
from tiktokguard.netfilter import Backstop, make_backend
from tiktokguard.policy.clients import ClientClassifier, DeviceIndex
from tiktokguard.policy.domains import DomainMatcher, ListError, load_lists
from tiktokguard.policy.engine import COUNTERMEASURES, PolicyEngine

# Settings bound at start: a reload that changes them says so, and they change on restart.
RESTART_KEYS = ("dns.listen", "dns.workers", "http.listen", "state.dir",
                "policy.neighbour_table", "netfilter.backend", "netfilter.table",
                "netfilter.set_v4", "netfilter.set_v6", "netfilter.exempt_v4",
                "netfilter.exempt_v6", "netfilter.exempt_mac")


def list_paths(policy: PolicyConfig) -> tuple[Path, ...]:
    """Every list file in use: the blocklists, and the DoH lists when block_public_doh is on."""
    return policy.blocklists + (policy.doh_lists if policy.block_public_doh else ())


def load_policy_lists(policy: PolicyConfig) -> tuple[DomainMatcher, DomainMatcher | None]:
    """The blocklists' matcher and the public-DoH matcher (None when not in use). ListError."""
    return (load_lists(policy.blocklists),
            load_lists(policy.doh_lists) if policy.block_public_doh else None)


def build_engine(config: Config, devices: DeviceIndex | None = None) -> PolicyEngine:
    """The policy engine for a config (also used by `tiktokguard check`). Raises ListError."""
    policy = config.policy
    if devices is None:
        devices = DeviceIndex()
    classifier = ClientClassifier(config.dns.allow_clients, policy.managed_networks,
                                  policy.edns_mac_trusted_relays, devices)
    matcher, doh = load_policy_lists(policy)
    return PolicyEngine(matcher, classifier, policy.bypass_countermeasures, doh)


def list_stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int] | None, ...]:
    """(mtime, size) of each list file: what the file watcher compares."""
    stamps: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def _setting(config: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


class DnsCore:
    def __init__(self, config: Config, metrics: Metrics, devices: DeviceIndex,
                 incidents: IncidentSink | None, macs: MacSource | None,
                 clock: Callable[[], float]) -> None:
        self.config = config
        self.metrics = metrics
        self.devices = devices
        self.engine = build_engine(config, devices)  # raises ListError before binding
        self._declare_rules()
        self.cache = AnswerCache(config.dns.cache_size, config.dns.cache_max_bytes)
        self.pool = self._make_pool(config)
        self.pipeline = Pipeline(self.engine, self.cache, self.pool, self._make_blocks(config),
                                 metrics, incidents=incidents, macs=macs, clock=clock)
        self.pipeline.ratelimit = self._make_ratelimit(config)
        self.pipeline.max_ttl = config.dns.max_ttl
        self.pipeline.max_negative_ttl = config.dns.max_negative_ttl
        self.server = ServerState(self.pipeline, config.dns.tcp_idle_timeout_ms / 1000,
                                  config.dns.max_tcp_connections, config.dns.max_tcp_per_client)
        backend = make_backend(config.netfilter)
        self.backstop = (Backstop(config.netfilter, backend, metrics, lambda: self.engine.matcher,
                                  lambda: self.pool) if backend is not None else None)
        self.pipeline.backstop = self.backstop
        self.listeners: list[asyncio.BaseTransport | asyncio.Server] = []
        self.list_error: str | None = None
        self.list_stamp = list_stamp(list_paths(config.policy))

    def _declare_rules(self) -> None:
        engine = self.engine
        rules = list(engine.matcher.rules.values()) + list(COUNTERMEASURES)
        if engine.doh is not None:
            rules += engine.doh.rules.values()
        self.metrics.stats.declare_rules(rules)

    def _make_pool(self, config: Config) -> UpstreamPool:
        stats = self.metrics.stats
        stats.declare_upstreams(str(u) for u in config.dns.upstreams)
        return UpstreamPool(config.dns.upstreams, config.dns.upstream_timeout_ms / 1000,
                            observe=stats.observe_upstream, count_error=stats.count_upstream_error)

    @staticmethod
    def _make_ratelimit(config: Config) -> RateLimiter | None:
        dns = config.dns
        return RateLimiter(dns.rate_limit_qps, dns.rate_limit_burst) if dns.rate_limit_qps else None

    @staticmethod
    def _make_blocks(config: Config) -> BlockAnswers:
        policy = config.policy
        return BlockAnswers(policy.block_mode, policy.block_ttl, policy.redirect_ipv4,
                            policy.redirect_ipv6)

    # -- listeners ------------------------------------------------------------------------------

    async def listen(self) -> None:
        """Bind every dns.listen address (shared with the other workers when there are any)."""
        self.listeners = await start_listeners(self.server, self.config.dns.listen,
                                               reuse_port=self.config.dns.workers > 1)

    def close(self) -> None:
        for item in self.listeners:
            item.close()
        for connection in list(self.server.tcp_connections):
            if connection.transport is not None:
                connection.transport.close()

    async def stop(self, drain_seconds: float) -> None:
        """Stop taking queries, answer the ones in flight (bounded), close."""
        self.server.stop_accepting()
        await self.server.drain(drain_seconds)
        self.close()

    # -- reloads --------------------------------------------------------------------------------

    def apply(self, new: Config) -> list[str]:
        """Apply a re-read config to everything that can change without rebinding; returns the
        keys (RESTART_KEYS) whose change waits for a restart."""
        old = self.config
        needs_restart = [key for key in RESTART_KEYS if _setting(old, key) != _setting(new, key)]
        kept_netfilter: dict[str, Any] = {key.split(".")[1]: _setting(old, key)
                                          for key in RESTART_KEYS if key.startswith("netfilter.")}
        new = replace(new, dns=replace(new.dns, listen=old.dns.listen, workers=old.dns.workers),
                      http=replace(new.http, listen=old.http.listen), state=old.state,
                      policy=replace(new.policy, neighbour_table=old.policy.neighbour_table),
                      netfilter=replace(new.netfilter, **kept_netfilter))
        policy = new.policy
        self.engine.classifier = ClientClassifier(new.dns.allow_clients, policy.managed_networks,
                                                  policy.edns_mac_trusted_relays, self.devices)
        self.engine.countermeasures = policy.bypass_countermeasures
        self.pipeline.blocks = self._make_blocks(new)
        if (new.dns.rate_limit_qps, new.dns.rate_limit_burst) != (old.dns.rate_limit_qps,
                                                                  old.dns.rate_limit_burst):
            self.pipeline.ratelimit = self._make_ratelimit(new)
        if (new.dns.upstreams, new.dns.upstream_timeout_ms) != (old.dns.upstreams,
                                                                old.dns.upstream_timeout_ms):
            self.pool.close()
            self.pool = self.pipeline.pool = self._make_pool(new)
        self.cache.resize(new.dns.cache_size, new.dns.cache_max_bytes)
        self.pipeline.max_ttl, self.pipeline.max_negative_ttl = (new.dns.max_ttl,
                                                                 new.dns.max_negative_ttl)
        self.server.tcp_idle_timeout = new.dns.tcp_idle_timeout_ms / 1000
        self.server.max_tcp = new.dns.max_tcp_connections
        self.server.max_tcp_per_client = new.dns.max_tcp_per_client
        if self.backstop is not None:
            self.backstop.config = new.netfilter
        self.config = new
        return needs_restart

    async def reload_lists(self) -> DomainMatcher:
        """Re-read the list files (in a thread) and swap them in; raises ListError and keeps
        the lists in force when a file is missing or has a bad line."""
        policy = self.config.policy
        stamp = list_stamp(list_paths(policy))
        try:
            matcher, doh = await asyncio.to_thread(load_policy_lists, policy)
        except ListError as exc:
            self.list_error = str(exc)
            self.list_stamp = stamp
            raise
        self.engine.matcher = matcher
        self.engine.doh = doh
        self._declare_rules()
        # Cached answers remember which blocked name they lead to (CNAME inspection); with new
        # lists that may have changed.
        self.cache.clear()
        self.list_error = None
        self.list_stamp = stamp
        return matcher
