"""The DNS side of one process: policy engine, cache, upstreams, query pipeline and listeners.

The daemon's main process has one (plus the control plane: API, store, incidents, sd_notify);
each extra worker process (`dns.workers` > 1) has one and nothing else. Both apply config and list
reloads through the same methods here, so a worker can never drift from the main process.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from tiktokguard.config import RESTART_KEYS, Config, HostPort, PolicyConfig, setting_of
from tiktokguard.dns import doh, tls
from tiktokguard.dns.answers import BlockAnswers, DdrAnswer
from tiktokguard.dns.cache import AnswerCache
from tiktokguard.dns.pipeline import IncidentSink, MacSource, Pipeline
from tiktokguard.dns.ratelimit import RateLimiter
from tiktokguard.dns.runtime import Runtime, TcpLimits
from tiktokguard.dns.server import ServerState, start_listeners, start_tls_listeners
from tiktokguard.dns.upstream import UpstreamPool
from tiktokguard.dnsname import text_to_wire
from tiktokguard.metrics import Metrics
from tiktokguard.netfilter import Backstop, make_backend
from tiktokguard.policy.clients import ClientClassifier, DeviceIndex
from tiktokguard.policy.domains import DomainMatcher, ListError, ListSource, load_lists
from tiktokguard.policy.engine import COUNTERMEASURES, PolicyEngine


def list_sources(policy: PolicyConfig) -> tuple[ListSource, ...]:
    """Every list in use: the blocklists, and the DoH lists when block_public_doh is on."""
    return policy.blocklists + (policy.doh_lists if policy.block_public_doh else ())


def list_paths(policy: PolicyConfig) -> tuple[Path, ...]:
    """The files those lists are read from (a URL list's: its last good copy)."""
    return tuple(source.path for source in list_sources(policy))


def load_policy_lists(policy: PolicyConfig) -> tuple[DomainMatcher, DomainMatcher | None]:
    """The blocklists' matcher and the public-DoH matcher (None when not in use), both with
    policy.exceptions. ListError."""
    return (load_lists(policy.blocklists, policy.exceptions),
            load_lists(policy.doh_lists, policy.exceptions) if policy.block_public_doh else None)


def build_engine(config: Config, devices: DeviceIndex | None = None) -> PolicyEngine:
    """The policy engine for a config (also used by `tiktokguard check`). Raises ListError."""
    matcher, doh = load_policy_lists(config.policy)
    return PolicyEngine(matcher, make_classifier(config, DeviceIndex() if devices is None
                                                 else devices),
                        config.policy.bypass_countermeasures, doh)


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


def keep_bound(old: Config, new: Config) -> Config:
    """`new` with the values of `old` for every key bound at start (RESTART_KEYS)."""
    kept: dict[str, dict[str, Any]] = {}
    for key in RESTART_KEYS:
        section, name = key.split(".")
        kept.setdefault(section, {})[name] = setting_of(old, key)
    return replace(new, **{section: replace(getattr(new, section), **values)
                           for section, values in kept.items()})


def make_classifier(config: Config, devices: DeviceIndex) -> ClientClassifier:
    policy = config.policy
    return ClientClassifier(config.dns.allow_clients, policy.managed_networks,
                            policy.edns_mac_trusted_relays, devices)


class DnsCore:
    """Owns the query path's objects. What configuration and lists decide is one Runtime value
    (dns/runtime.py), built here and swapped into the pipeline whole; `config` is the parsed
    configuration it was built from."""

    def __init__(self, config: Config, metrics: Metrics, devices: DeviceIndex,
                 incidents: IncidentSink | None, macs: MacSource | None,
                 clock: Callable[[], float]) -> None:
        self.config = config
        self.metrics = metrics
        self.devices = devices
        engine = build_engine(config, devices)  # raises ListError before binding
        self._declare_rules(engine)
        self.cache = AnswerCache(config.dns.cache_size, config.dns.cache_max_bytes,
                                 config.dns.serve_stale)
        backend = make_backend(config.netfilter)
        self.backstop = (Backstop(lambda: self.config.netfilter, backend, metrics,
                                  lambda: self.runtime.engine.matcher, lambda: self.runtime.pool)
                         if backend is not None else None)
        self.pipeline = Pipeline(self._build(config, engine, None), self.cache, metrics,
                                 incidents=incidents, macs=macs, backstop=self.backstop,
                                 clock=clock)
        self.server = ServerState(self.pipeline)
        self.listeners: list[asyncio.BaseTransport | asyncio.Server] = []
        self.tls_context: ssl.SSLContext | None = None
        self.doh: web.AppRunner | None = None
        self.list_error: str | None = None
        self.list_stamp = list_stamp(list_paths(config.policy))

    @property
    def runtime(self) -> Runtime:
        return self.pipeline.runtime

    @property
    def engine(self) -> PolicyEngine:
        return self.pipeline.runtime.engine

    @property
    def pool(self) -> UpstreamPool:
        return self.pipeline.runtime.pool

    def _declare_rules(self, engine: PolicyEngine) -> None:
        rules = list(engine.matcher.rules.values()) + list(COUNTERMEASURES)
        if engine.doh is not None:
            rules += engine.doh.rules.values()
        self.metrics.stats.declare_rules(rules)

    def _build(self, config: Config, engine: PolicyEngine, old: Runtime | None) -> Runtime:
        """The Runtime for a config: the parts whose settings did not change are kept (the pool
        its upstreams' health, the rate limiter its buckets)."""
        dns, policy = config.dns, config.policy
        was = self.config.dns
        if old is not None and (dns.upstreams, dns.upstream_timeout_ms, dns.upstream_tls_ca) == (
                was.upstreams, was.upstream_timeout_ms, was.upstream_tls_ca):
            pool = old.pool
        else:
            pool = self._make_pool(dns.upstreams, dns.upstream_timeout_ms, dns.upstream_tls_ca)
        if old is not None and (dns.forward, dns.upstream_timeout_ms, dns.upstream_tls_ca) == (
                was.forward, was.upstream_timeout_ms, was.upstream_tls_ca):
            forward = old.forward
        else:
            forward = {}
            for zone in dns.forward:
                zone_pool = self._make_pool(zone.upstreams, dns.upstream_timeout_ms,
                                            dns.upstream_tls_ca)
                forward.update((text_to_wire(name), zone_pool) for name in zone.zones)
        if old is not None and (dns.rate_limit_qps, dns.rate_limit_burst) == (
                was.rate_limit_qps, was.rate_limit_burst):
            ratelimit = old.ratelimit
        else:
            ratelimit = (RateLimiter(dns.rate_limit_qps, dns.rate_limit_burst)
                         if dns.rate_limit_qps else None)
        blocks = BlockAnswers(policy.block_mode, policy.block_ttl, policy.redirect_ipv4,
                              policy.redirect_ipv6)
        tcp = TcpLimits(dns.tcp_idle_timeout_ms / 1000, dns.max_tcp_connections,
                        dns.max_tcp_per_client, dns.tcp_client_prefix_v4,
                        dns.tcp_client_prefix_v6)
        ddr = None
        if dns.tls_name and (dns.tls_listen or dns.https_listen):
            ddr = DdrAnswer(dns.tls_name, tuple(sorted({a.port for a in dns.tls_listen})),
                            tuple(sorted({a.port for a in dns.https_listen})))
        return Runtime(engine, blocks, pool, ratelimit, dns.max_ttl, dns.max_negative_ttl, tcp,
                       forward, ddr)

    def _make_pool(self, upstreams: tuple[HostPort, ...], timeout_ms: int,
                   tls_ca: str) -> UpstreamPool:
        stats = self.metrics.stats
        stats.declare_upstreams(str(u) for u in upstreams)
        context = None
        if any(u.tls_name for u in upstreams):
            # DoT upstreams: their certificates checked against their names, by the system's
            # authorities or dns.upstream_tls_ca.
            context = ssl.create_default_context(cafile=tls_ca or None)
        return UpstreamPool(upstreams, timeout_ms / 1000, observe=stats.observe_upstream,
                            count_error=stats.count_upstream_error, tls_context=context)

    # -- listeners ------------------------------------------------------------------------------

    async def listen(self, encrypted: bool = False) -> None:
        """Bind every dns.listen address (shared with the other workers when there are any);
        with `encrypted` (the main process), the DoT and DoH listeners too."""
        dns = self.config.dns
        self.listeners = await start_listeners(self.server, dns.listen,
                                               reuse_port=dns.workers > 1)
        if not encrypted or not (dns.tls_listen or dns.https_listen):
            return
        self.tls_context = tls.server_context(Path(dns.tls_certificate),
                                              Path(dns.tls_private_key))
        try:
            self.listeners += await start_tls_listeners(
                self.server, dns.tls_listen, self.tls_context,
                dns.tls_handshake_timeout_ms / 1000)
            if dns.https_listen:
                self.doh = await doh.start(self.pipeline.handle, dns.https_listen,
                                           self.tls_context,
                                           self.metrics.http_malformed.labels("doh").inc)
        except BaseException:
            self.close()
            raise

    def reload_certificate(self) -> str | None:
        """SIGHUP: the certificate and key read again into the context in force (open
        connections keep theirs). The error, when they cannot be loaded (the old ones stay)."""
        dns = self.config.dns
        if self.tls_context is None:
            return None
        try:
            tls.reload(self.tls_context, Path(dns.tls_certificate), Path(dns.tls_private_key))
        except (OSError, ValueError) as exc:
            return f"{dns.tls_certificate}: {exc}"
        return None

    async def close_doh(self) -> None:
        if self.doh is not None:
            await self.doh.cleanup()
            self.doh = None

    def close(self) -> None:
        for item in self.listeners:
            item.close()
        for pool in self.runtime.pools():
            pool.close()  # (their sockets, and the probes of set-aside upstreams)
        for connection in list(self.server.tcp_connections):
            if connection.transport is not None:
                connection.transport.close()

    async def stop(self, drain_seconds: float) -> None:
        """Stop taking queries, answer the ones in flight (bounded), close."""
        self.server.stop_accepting()
        await self.server.drain(drain_seconds)
        await self.close_doh()
        self.close()

    # -- reloads --------------------------------------------------------------------------------

    def apply(self, new: Config) -> list[str]:
        """Put a re-read config in force: everything but the keys bound at start, which are
        returned when they changed (a restart applies them). One swap of the runtime."""
        old = self.config
        needs_restart = [key for key in RESTART_KEYS
                         if setting_of(old, key) != setting_of(new, key)]
        new = keep_bound(old, new)
        current = self.runtime
        engine = PolicyEngine(current.engine.matcher, make_classifier(new, self.devices),
                              new.policy.bypass_countermeasures, current.engine.doh)
        runtime = self._build(new, engine, current)
        self.pipeline.runtime = runtime
        self.config = new
        kept = {id(pool) for pool in runtime.pools()}
        for pool in {id(p): p for p in current.pools()}.values():
            if id(pool) not in kept:
                pool.close()
        if runtime.forward is not current.forward:
            self.cache.clear()  # answers of names whose zone now has other upstreams
        self.cache.resize(new.dns.cache_size, new.dns.cache_max_bytes, new.dns.serve_stale)
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
        current = self.runtime
        engine = PolicyEngine(matcher, current.engine.classifier,
                              current.engine.countermeasures, doh)
        self._declare_rules(engine)
        self.pipeline.runtime = replace(current, engine=engine)
        # Cached answers remember which blocked name they lead to (CNAME inspection); with new
        # lists that may have changed.
        self.cache.clear()
        self.list_error = None
        self.list_stamp = stamp
        return matcher
