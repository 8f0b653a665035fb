"""The daemon: builds the components from a Config, owns their lifecycle and signals.

Resources are entered through one AsyncExitStack and released in reverse. Signals only set an
event or schedule a reload; this class acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from tiktokguard.api.app import make_app
from tiktokguard.api.auth import TokenTable, ensure_tokens
from tiktokguard.config import Config, ConfigError, Overrides, load_config
from tiktokguard.devices.service import DeviceService
from tiktokguard.devices.store import SqliteStore, Store
from tiktokguard.dns.answers import BlockAnswers
from tiktokguard.dns.cache import AnswerCache
from tiktokguard.dns.resolver import Resolver
from tiktokguard.dns.server import ServerState, start_listeners
from tiktokguard.dns.upstream import UpstreamPool
from tiktokguard.incidents import IncidentAggregator
from tiktokguard.logs import get_logger
from tiktokguard.metrics import Metrics
from tiktokguard.neighbours import NeighbourTable
from tiktokguard.policy.clients import ClientClassifier, DeviceIndex
from tiktokguard.policy.domains import DomainMatcher, ListError, load_lists
from tiktokguard.policy.engine import PolicyEngine
from tiktokguard.sdnotify import Notifier

LIST_POLL_SECONDS = 5.0
DRAIN_SECONDS = 5.0
EXPIRY_CHECK_SECONDS = 60.0
UPSTREAM_READY_WINDOW = 30.0
DB_FILE = "tiktokguard.sqlite3"
log = get_logger()


def build_engine(config: Config, devices: DeviceIndex | None = None,
                 matcher: DomainMatcher | None = None) -> PolicyEngine:
    """The policy engine for a config (also used by `tiktokguard check`). Raises ListError."""
    policy = config.policy
    if devices is None:
        devices = DeviceIndex()
    classifier = ClientClassifier(config.dns.allow_clients, policy.managed_networks,
                                  policy.edns_mac_trusted_relays, devices)
    if matcher is None:
        matcher = load_lists(policy.blocklists)
    return PolicyEngine(matcher, classifier, policy.bypass_countermeasures)


def _list_stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int] | None, ...]:
    stamps: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_mtime_ns, st.st_size))
    return tuple(stamps)


class Daemon:
    def __init__(self, config: Config, overrides: Overrides | None = None,
                 clock: Callable[[], float] = time.time,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.overrides = overrides or Overrides()
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.devices = DeviceIndex()
        self.engine = build_engine(config, self.devices)  # raises ListError before binding
        self.cache = AnswerCache(config.dns.cache_size)
        self.pool = self._make_pool(config)
        policy = config.policy
        self.incidents = IncidentAggregator(
            config.incidents.window_seconds, self.metrics, config.incidents.webhook_url,
            config.incidents.retention_days, config.incidents.max_rows,
            describe=self._describe_client, clock=clock)
        self.neighbours = (NeighbourTable(self.metrics, lambda: self.devices.has_macs)
                           if policy.neighbour_table else None)
        self.resolver = Resolver(self.engine, self.cache, self.pool, self._make_blocks(config),
                                 self.metrics, incidents=self.incidents, macs=self.neighbours,
                                 clock=clock)
        self.server = ServerState(self.resolver, config.dns.tcp_idle_timeout_ms / 1000,
                                  config.dns.max_tcp_connections)
        self.store: Store | None = None
        self.devices_service: DeviceService | None = None
        self.tokens = TokenTable({})
        self.token_file: Path | None = None
        self._expiry_wake = asyncio.Event()
        self.listeners: list[asyncio.BaseTransport | asyncio.Server] = []
        self.list_error: str | None = None
        self._list_stamp = _list_stamp(policy.blocklists)
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.metrics.blocklist_rules.set(len(self.engine.matcher))

    def _make_pool(self, config: Config) -> UpstreamPool:
        return UpstreamPool(config.dns.upstreams, config.dns.upstream_timeout_ms / 1000,
                            observe=self.metrics.stats.observe_upstream,
                            count_error=self.metrics.stats.count_upstream_error)

    @staticmethod
    def _make_blocks(config: Config) -> BlockAnswers:
        policy = config.policy
        return BlockAnswers(policy.block_mode, policy.block_ttl, policy.redirect_ipv4,
                            policy.redirect_ipv6)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Open the state, bind every listener (raises OSError naming the address) and start
        the background work. Everything is undone in reverse by the stack."""
        state_dir = self.config.state.dir
        self.store = store = await SqliteStore.open(state_dir / DB_FILE)
        stack.push_async_callback(store.close)
        self.devices_service = DeviceService(store, self.devices)
        self.devices_service.on_change.append(self._expiry_wake.set)
        if self.neighbours is not None:
            self.devices_service.on_change.append(self.neighbours.changed)
        await self.devices_service.load()
        await self._load_tokens()
        self.incidents.store = store
        await self._task(stack, self.incidents.run())
        await self._task(stack, self.incidents.webhook_worker())
        await self._task(stack, self._watch_expiry())
        if self.neighbours is not None:
            await self._task(stack, self.neighbours.run())
        self.listeners = await start_listeners(self.server, self.config.dns.listen)
        stack.callback(self._close_listeners)
        if self.config.http.listen is not None:
            runner = web.AppRunner(make_app(self), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            address = self.config.http.listen
            try:
                await web.TCPSite(runner, address.host, address.port).start()
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address} (http): "
                                         f"{exc.strerror}") from None
        await self._task(stack, self._watch_lists())
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            await self._task(stack, self._watchdog(interval))

    async def _load_tokens(self) -> None:
        assert self.store is not None
        configured = {n: (t.role, t.sha256) for n, t in self.config.http.tokens.items()}
        self.tokens, created = await ensure_tokens(self.store, configured, self.config.state.dir)
        if created is not None:
            self.token_file = created

    async def _task(self, stack: contextlib.AsyncExitStack, coro: Coroutine[Any, Any, Any]
                    ) -> None:
        """Run coro in the background until the stack unwinds, then cancel and await it."""
        task = asyncio.get_running_loop().create_task(coro)

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stack.push_async_callback(stop)

    async def _watchdog(self, interval: float) -> None:
        # Sent from the event loop itself: if the loop stalls, the pings stop and systemd
        # restarts us (WatchdogSec=).
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _close_listeners(self) -> None:
        for item in self.listeners:
            item.close()
        for connection in list(self.server.tcp_connections):
            if connection.transport is not None:
                connection.transport.close()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or stop()); SIGHUP reloads config and lists."""
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.notifier.close)
            await self.start(stack)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
                stack.callback(loop.remove_signal_handler, sig)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload("SIGHUP")))
            stack.callback(loop.remove_signal_handler, signal.SIGHUP)
            if self.token_file is not None:
                # Printed once, on the start that created it (DESIGN §3 embedded default).
                print(f"tiktokguard: admin API token written to {self.token_file}",
                      file=sys.stderr)
                log.info("admin_token_created", path=str(self.token_file))
            log.info("started", dns=[str(a) for a in self.config.dns.listen],
                     http=str(self.config.http.listen) if self.config.http.listen else None,
                     upstreams=[str(u) for u in self.config.dns.upstreams],
                     rules=len(self.engine.matcher), config=self.config.source)
            self.notifier.ready(self.status_line())
            await self._stop.wait()
            self.notifier.stopping()
            log.info("stopping", inflight=len(self.server.tasks))
            # Stop taking queries, answer those in flight (bounded), then close; the stack
            # then flushes incident counts and closes the store.
            self.server.stop_accepting()
            await self.server.drain(DRAIN_SECONDS)
            self._close_listeners()
        log.info("stopped")

    def stop(self) -> None:
        self._stop.set()

    # -- reload -------------------------------------------------------------------------------

    async def reload(self, reason: str) -> bool:
        """Re-read the config file and the lists and apply what can change without rebinding.
        A broken config or list keeps what is in force, and says why. True if all applied."""
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                return await self._reload(reason)
            finally:
                self.notifier.ready(self.status_line())

    async def _reload(self, reason: str) -> bool:
        source = None if self.config.source == "<embedded default>" else self.config.source
        try:
            new = await asyncio.to_thread(load_config, source, self.overrides)
        except ConfigError as exc:
            log.error("config_reload_failed", reason=reason, error=str(exc))
            return False
        if new != self.config:
            await self._apply(new, reason)
        return await self._reload_lists(reason)

    async def _apply(self, new: Config, reason: str) -> None:
        old = self.config
        fixed = {"dns.listen": (old.dns.listen, new.dns.listen),
                 "http.listen": (old.http.listen, new.http.listen),
                 "state.dir": (old.state.dir, new.state.dir),
                 "policy.neighbour_table": (old.policy.neighbour_table,
                                            new.policy.neighbour_table)}
        needs_restart = [key for key, (a, b) in fixed.items() if a != b]
        if needs_restart:
            log.warning("restart_required", reason=reason, keys=needs_restart,
                        detail="these settings change only when tiktokguard restarts")
        # What is bound stays as it is; everything else takes the new values.
        new = replace(new, dns=replace(new.dns, listen=old.dns.listen),
                      http=replace(new.http, listen=old.http.listen), state=old.state,
                      policy=replace(new.policy, neighbour_table=old.policy.neighbour_table))
        policy = new.policy
        self.engine.classifier = ClientClassifier(new.dns.allow_clients, policy.managed_networks,
                                                  policy.edns_mac_trusted_relays, self.devices)
        self.engine.countermeasures = policy.bypass_countermeasures
        self.resolver.blocks = self._make_blocks(new)
        if (new.dns.upstreams, new.dns.upstream_timeout_ms) != (old.dns.upstreams,
                                                                old.dns.upstream_timeout_ms):
            self.pool = self.resolver.pool = self._make_pool(new)
        self.cache.resize(new.dns.cache_size)
        self.server.tcp_idle_timeout = new.dns.tcp_idle_timeout_ms / 1000
        self.server.max_tcp = new.dns.max_tcp_connections
        incidents = new.incidents
        self.incidents.window = incidents.window_seconds
        self.incidents.webhook_url = incidents.webhook_url
        self.incidents.retention_days = incidents.retention_days
        self.incidents.max_rows = incidents.max_rows
        self.config = new
        await self._load_tokens()
        log.info("config_reloaded", reason=reason, config=new.source)

    async def _reload_lists(self, reason: str) -> bool:
        paths = self.config.policy.blocklists
        stamp = _list_stamp(paths)
        try:
            matcher = await asyncio.to_thread(load_lists, paths)
        except ListError as exc:
            self.list_error = str(exc)
            self._list_stamp = stamp
            self.metrics.list_reload_errors.inc()
            log.error("blocklists_reload_failed", reason=reason, error=str(exc),
                      kept_rules=len(self.engine.matcher))
            return False
        self.engine.matcher = matcher
        # Cached answers remember which blocked name they lead to (CNAME inspection);
        # with new lists that may have changed.
        self.cache.clear()
        self.list_error = None
        self._list_stamp = stamp
        self.metrics.blocklist_rules.set(len(matcher))
        log.info("blocklists_reloaded", reason=reason, rules=len(matcher))
        return True

    async def reload_lists(self, reason: str) -> bool:
        """Re-read only the list files (API call, a list file changed on disk)."""
        async with self._reload_lock:
            return await self._reload_lists(reason)

    async def _watch_lists(self) -> None:
        while True:
            await asyncio.sleep(LIST_POLL_SECONDS)
            if _list_stamp(self.config.policy.blocklists) != self._list_stamp:
                await self.reload_lists("list file changed")

    # -- devices ------------------------------------------------------------------------------

    async def _watch_expiry(self) -> None:
        """Audit each device's expiry once, when it happens (the index already stops exempting
        it at that moment; this documents it, as the policy asks IT to)."""
        service = self.devices_service
        assert service is not None
        while True:
            await service.audit_expiries()
            upcoming = service.next_expiry()
            wait = EXPIRY_CHECK_SECONDS
            if upcoming is not None:
                wait = min(wait, max(0.0, upcoming.timestamp() - self.clock()) + 0.01)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._expiry_wake.wait()
            self._expiry_wake.clear()

    def _describe_client(self, client_ip: str, mac: str | None) -> str | None:
        """The name of a (deactivated or expired) device record matching a blocked client."""
        if self.devices_service is None:
            return None
        for record in self.devices_service.records.values():
            if mac is not None and mac in record.macs:
                return record.name
        for record in self.devices_service.records.values():
            if client_ip in record.addresses:
                return record.name
        return None

    # -- status -------------------------------------------------------------------------------

    def readiness_problems(self) -> list[str]:
        problems = []
        if not self.listeners:
            problems.append("DNS listeners not bound")
        if self.list_error:
            problems.append(f"last list reload failed: {self.list_error}")
        if self.pool.failing_since(time.monotonic(), UPSTREAM_READY_WINDOW):
            problems.append(f"no upstream has answered for {UPSTREAM_READY_WINDOW:g} s "
                            "while queries were failing")
        return problems

    def status_line(self) -> str:
        return (f"serving: {len(self.engine.matcher)} rules, "
                f"{self.devices.active_count(self.clock())} allowlisted devices")

    def refresh_gauges(self) -> None:
        self.metrics.allowlisted_devices.set(self.devices.active_count(self.clock()))
        self.metrics.blocklist_rules.set(len(self.engine.matcher))
