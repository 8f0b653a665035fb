"""The daemon: builds the components from a Config, owns their lifecycle and signals.

Resources are entered through one AsyncExitStack and released in reverse. Signals only set an
event or schedule a reload; this class acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from tiktokguard.api.app import make_app
from tiktokguard.config import Config
from tiktokguard.dns.answers import BlockAnswers
from tiktokguard.dns.cache import AnswerCache
from tiktokguard.dns.resolver import Resolver
from tiktokguard.dns.server import ServerState, start_listeners
from tiktokguard.dns.upstream import UpstreamPool
from tiktokguard.logs import get_logger
from tiktokguard.metrics import Metrics
from tiktokguard.policy.clients import ClientClassifier, DeviceIndex
from tiktokguard.policy.domains import DomainMatcher, ListError, load_lists
from tiktokguard.policy.engine import PolicyEngine

LIST_POLL_SECONDS = 5.0
DRAIN_SECONDS = 5.0
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
    def __init__(self, config: Config, devices: DeviceIndex | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Metrics()
        self.devices = devices if devices is not None else DeviceIndex()
        self.engine = build_engine(config, self.devices)  # raises ListError before binding
        self.cache = AnswerCache(config.dns.cache_size)
        self.pool = UpstreamPool(config.dns.upstreams, config.dns.upstream_timeout_ms / 1000,
                                 observe=self.metrics.observe_upstream,
                                 count_error=self.metrics.count_upstream_error)
        policy = config.policy
        self.blocks = BlockAnswers(policy.block_mode, policy.block_ttl, policy.redirect_ipv4,
                                   policy.redirect_ipv6)
        self.resolver = Resolver(self.engine, self.cache, self.pool, self.blocks, self.metrics,
                                 clock=clock)
        self.server = ServerState(self.resolver, config.dns.tcp_idle_timeout_ms / 1000,
                                  config.dns.max_tcp_connections)
        self.listeners: list[asyncio.BaseTransport | asyncio.Server] = []
        self.http_runner: web.AppRunner | None = None
        self.list_error: str | None = None
        self._list_stamp = _list_stamp(policy.blocklists)
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.metrics.blocklist_rules.set(len(self.engine.matcher))

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Bind every listener (raises OSError naming the address) and start background work."""
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
            self.http_runner = runner
        watcher = asyncio.get_running_loop().create_task(self._watch_lists())
        stack.callback(watcher.cancel)

    def _close_listeners(self) -> None:
        for item in self.listeners:
            item.close()
        for connection in list(self.server.tcp_connections):
            if connection.transport is not None:
                connection.transport.close()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or stop()); SIGHUP reloads the lists."""
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            await self.start(stack)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
                stack.callback(loop.remove_signal_handler, sig)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload("SIGHUP")))
            stack.callback(loop.remove_signal_handler, signal.SIGHUP)
            log.info("started", dns=[str(a) for a in self.config.dns.listen],
                     http=str(self.config.http.listen) if self.config.http.listen else None,
                     upstreams=[str(u) for u in self.config.dns.upstreams],
                     rules=len(self.engine.matcher), config=self.config.source)
            await self._stop.wait()
            log.info("stopping", inflight=len(self.server.tasks))
            self._close_listeners()
            await self.server.drain(DRAIN_SECONDS)
        log.info("stopped")

    def stop(self) -> None:
        self._stop.set()

    # -- lists --------------------------------------------------------------------------------

    async def reload(self, reason: str) -> bool:
        """Re-read the list files; on any error keep the lists in force and say why."""
        async with self._reload_lock:
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

    async def _watch_lists(self) -> None:
        while True:
            await asyncio.sleep(LIST_POLL_SECONDS)
            if _list_stamp(self.config.policy.blocklists) != self._list_stamp:
                await self.reload("list file changed")

    # -- status -------------------------------------------------------------------------------

    def readiness_problems(self) -> list[str]:
        problems = []
        if not self.listeners:
            problems.append("DNS listeners not bound")
        if self.list_error:
            problems.append(f"last list reload failed: {self.list_error}")
        return problems

    def refresh_gauges(self) -> None:
        self.metrics.allowlisted_devices.set(self.devices.active_count(self.clock()))
        self.metrics.blocklist_rules.set(len(self.engine.matcher))
