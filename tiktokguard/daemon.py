"""The daemon: the DNS core plus the control plane, their lifecycle and signals.

Resources are entered through one AsyncExitStack and released in reverse. Signals only set an
event or schedule a reload; this class acts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from tiktokguard import __version__
from tiktokguard.api.app import make_app
from tiktokguard.api.auth import TokenAdmin, TokenTable, ensure_tokens
from tiktokguard.api.server import ApiServer
from tiktokguard.config import Config, ConfigError, Overrides, load_config
from tiktokguard.core import DnsCore, build_engine, list_paths, list_sources, list_stamp
from tiktokguard.devices.service import DeviceService
from tiktokguard.devices.store import SqliteStore, Store, StoreUnavailable
from tiktokguard.dns.cache import AnswerCache
from tiktokguard.dns.pipeline import Pipeline
from tiktokguard.dns.server import ServerState
from tiktokguard.dns.upstream import UpstreamPool
from tiktokguard.incidents import IncidentAggregator
from tiktokguard.listfetch import ListFetcher
from tiktokguard.logs import get_logger
from tiktokguard.metrics import Metrics
from tiktokguard.neighbours import NeighbourTable
from tiktokguard.netfilter import Exemptions
from tiktokguard.policy.clients import DeviceIndex
from tiktokguard.policy.domains import ListError
from tiktokguard.policy.engine import Decision, PolicyEngine
from tiktokguard.sdnotify import Notifier
from tiktokguard.workers import WorkerPool

LIST_POLL_SECONDS = 5.0
DRAIN_SECONDS = 5.0
EXPIRY_CHECK_SECONDS = 60.0
UPSTREAM_READY_WINDOW = 30.0
DB_FILE = "tiktokguard.sqlite3"
# Held (shared) by every daemon on the state folder while it runs, so that `migrate` can tell
# that the database it copies is still being written.
IN_USE_FILE = "serve.lock"
SNAPSHOT_FILE = "devices.snapshot.json"  # a shared store's devices as last known
DEGRADED = "degraded"  # a component's state that starts so: ready, but not whole
# The signals the daemon acts on (docs/reference.md is generated from this).
SIGNALS: dict[str, str] = {
    "SIGTERM": "stop: stop taking queries, answer those in flight (at most 5 s), flush incident "
               "counts, exit 0",
    "SIGINT": "the same as SIGTERM",
    "SIGHUP": "reload: re-read the config file and the list files; keys that need a restart "
              "are named in a restart_required event (systemctl reload)",
}
log = get_logger()

__all__ = ["Daemon", "build_engine"]


def hold_in_use(state_dir: Path) -> int:
    """A shared flock on the state folder's IN_USE_FILE, held until the descriptor is closed
    (the kernel lets go of it however the process ends)."""
    fd = os.open(state_dir / IN_USE_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def in_use(state_dir: Path) -> bool:
    """Whether a running daemon holds state_dir (its IN_USE_FILE)."""
    try:
        fd = os.open(state_dir / IN_USE_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # never served, or by a version before the file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class Daemon:
    def __init__(self, config: Config, overrides: Overrides | None = None,
                 clock: Callable[[], float] = time.time,
                 notifier: Notifier | None = None) -> None:
        self.overrides = overrides or Overrides()
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.devices = DeviceIndex()
        self.incidents = IncidentAggregator(config.incidents, self.metrics,
                                            describe=self._describe_client, clock=clock)
        self.neighbours = (NeighbourTable(self.metrics, lambda: self.devices.has_macs)
                           if config.policy.neighbour_table else None)
        # Raises ListError (a bad list) before anything is bound.
        self.core = DnsCore(config, self.metrics, self.devices, self.incidents, self.neighbours,
                            clock)
        self.workers = WorkerPool(config.dns.workers, config=lambda: self.core.config,
                                  devices=lambda: self.devices, stats=self.metrics.stats,
                                  blocked=lambda entry: self.incidents.merge(*entry))
        self.store: Store | None = None
        self.devices_service: DeviceService | None = None
        self.tokens = TokenTable({})
        self.token_file: Path | None = None
        self._expiry_wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.metrics.blocklist_rules.set(len(self.engine.matcher))
        self.lists = ListFetcher(lambda: list_sources(self.config.policy),
                                 lambda: self.config.policy.blocklist_refresh, self.metrics,
                                 self.reload_lists, clock=clock)
        self._lists_loaded()

    # The DNS core's parts, typed, for the tests and tools that look inside a running daemon.
    @property
    def config(self) -> Config:
        return self.core.config

    @property
    def engine(self) -> PolicyEngine:
        return self.core.engine

    @property
    def cache(self) -> AnswerCache:
        return self.core.cache

    @property
    def pool(self) -> UpstreamPool:
        return self.core.pool

    @property
    def pipeline(self) -> Pipeline:
        return self.core.pipeline

    @property
    def server(self) -> ServerState:
        return self.core.server

    @property
    def list_error(self) -> str | None:
        return self.core.list_error

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Open the state, bind every listener (raises OSError naming the address) and start
        the background work. Everything is undone in reverse by the stack."""
        state_dir = self.config.state.dir
        store, snapshot = await self._open_store(state_dir)
        self.store = store
        stack.push_async_callback(store.close)
        if isinstance(store, SqliteStore):
            stack.callback(os.close, hold_in_use(state_dir))
        self.devices_service = DeviceService(
            store, self.devices, clock=lambda: datetime.fromtimestamp(self.clock(), UTC),
            snapshot=snapshot, served=lambda: self.config.dns.allow_clients)
        self.devices_service.on_change.append(self._expiry_wake.set)
        self.devices_service.propagate.append(self.workers.devices_changed)
        if self.neighbours is not None:
            self.devices_service.on_change.append(self.neighbours.changed)
        try:
            await self.devices_service.load()
        except StoreUnavailable as exc:
            # DNS decides from the devices as last known; the watcher reconnects and reloads.
            # Logged once, here, with its cause; the watcher logs only what comes after.
            known = await self.devices_service.load_snapshot()
            log.error("store_unavailable", instance=store.instance,
                      error=getattr(store, "unavailable", None) or str(exc),
                      devices="the local snapshot" if known else "none known yet")
        await self._load_tokens()
        self.incidents.store = store
        self.metrics.store_up.set_function(lambda: 1 if store.up else 0)
        watch = getattr(store, "watch", None)  # a shared store: changes by other instances
        if watch is not None:
            await self._task(stack, watch(self._store_changed, self._store_reconnected,
                                          self._store_up))
        # A URL list with no copy yet is fetched before serving (bounded by the fetch timeout);
        # one with a copy is served from it and refreshed in the background.
        if await self.lists.fetch_all(missing_only=True):
            await self._reload_lists("lists fetched at start")
        with contextlib.suppress(StoreUnavailable):  # (a shared store that is down: none)
            await self.incidents.restore_from_store()  # no duplicate incident after a restart
        await self._task(stack, self.incidents.run())
        await self._task(stack, self.incidents.webhook_worker())
        await self._task(stack, self._watch_expiry())
        if self.neighbours is not None:
            await self._task(stack, self.neighbours.run())
        backstop = self.core.backstop
        if backstop is not None:
            # This process owns the device store: it keeps the exemption sets in step with it.
            backstop.exemptions = lambda: Exemptions.of(self.devices.devices.values(),
                                                        self.clock())
            self.devices_service.propagate.append(backstop.sync_exemptions)
            await self._task(stack, backstop.run())
        await self.core.listen(encrypted=True)
        stack.callback(self.core.close)
        stack.push_async_callback(self.core.close_doh)
        stack.push_async_callback(self.workers.stop)
        await self.workers.start()
        if self.config.http.listen is not None:
            # Its own thread and loop: no HTTP client can delay DNS (api/server.py).
            app = make_app(devices=self.devices_service, store=store,
                           tokens=lambda: self.tokens,
                           auth_failed=self.metrics.api_auth_failures.inc,
                           token_admin=TokenAdmin(store, self._configured_tokens,
                                                  self._load_tokens),
                           http_settings=lambda: self.config.http,
                           readiness=self.readiness, collect_metrics=self.collect_metrics,
                           sync_incidents=self.sync_incidents, decide=self.decide,
                           reload_lists=self.api_reload_lists)
            api = ApiServer(app, self.config.http.listen,
                            on_refused=self.metrics.api_connections_refused.inc,
                            on_malformed=self.metrics.http_malformed.labels("api").inc)
            await api.start()
            stack.push_async_callback(api.stop)
        await self._task(stack, self._watch_lists())
        await self._task(stack, self.lists.run())
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            await self._task(stack, self._watchdog(interval))

    async def _open_store(self, state_dir: Path) -> tuple[Store, Path | None]:
        """The store [store] names, and where its local snapshot lives (a shared store's). A
        PostgreSQL server that cannot be reached does not stop the start (degraded mode)."""
        config = self.config.store
        if config.backend != "postgres":
            return await SqliteStore.open(state_dir / DB_FILE, config.instance), None
        from tiktokguard.devices.pgstore import PostgresStore, read_password  # (asyncpg: only here)

        password = read_password(config.password_file)
        try:
            pg = await PostgresStore.open(config.dsn, password, config.instance)
        except StoreUnavailable as exc:
            pg = PostgresStore(config.dsn, password, config.instance)  # the watcher connects
            pg.unavailable = str(exc)  # why, for the one line the start logs
        return pg, state_dir / SNAPSHOT_FILE

    async def _store_changed(self, what: str) -> None:
        """Another instance (or this one) changed a device or the tokens in the shared store."""
        if what == "tokens":
            await self._load_tokens()
        elif self.devices_service is not None:
            await self.devices_service.apply_remote(what)

    async def _store_reconnected(self) -> None:
        """The shared store is back: everything is read again (changes made meanwhile were not
        notified), tokens included."""
        assert self.devices_service is not None
        await self.devices_service.load()
        await self._load_tokens()

    def _store_up(self, up: bool) -> None:
        """The watcher's word on the shared store: systemd's STATUS says it (the gauge reads
        store.up itself)."""
        self.notifier.ready(self.status_line())

    def _configured_tokens(self) -> dict[str, tuple[str, str]]:
        return {n: (t.role, t.sha256) for n, t in self.config.http.tokens.items()}

    async def _load_tokens(self) -> None:
        assert self.store is not None
        configured = self._configured_tokens()
        try:
            self.tokens, created = await ensure_tokens(self.store, configured,
                                                       self.config.state.dir)
        except StoreUnavailable:
            # The stored tokens in force stay (none yet at a start: read once it is back);
            # the configured ones always work.
            self.tokens = TokenTable.merged(self.tokens, configured)
            return
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

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or stop()); SIGHUP reloads config and lists."""
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.notifier.close)
            await self.start(stack)
            for sig in (signal.SIGTERM, signal.SIGINT):  # (SIGNALS)
                loop.add_signal_handler(sig, self._stop.set)
                stack.callback(loop.remove_signal_handler, sig)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload("SIGHUP")))
            stack.callback(loop.remove_signal_handler, signal.SIGHUP)
            if self.token_file is not None:
                # Printed once, on the start that created it (docs/design.md §3 embedded default).
                print(f"tiktokguard: admin API token written to {self.token_file}",
                      file=sys.stderr)
                log.info("admin_token_created", path=str(self.token_file))
            log.info("started", version=__version__,
                     dns=[str(a) for a in self.config.dns.listen],
                     dot=[str(a) for a in self.config.dns.tls_listen],
                     doh=[str(a) for a in self.config.dns.https_listen],
                     http=str(self.config.http.listen) if self.config.http.listen else None,
                     upstreams=[str(u) for u in self.config.dns.upstreams],
                     rules=len(self.engine.matcher), workers=self.config.dns.workers,
                     config=self.config.source)
            self.notifier.ready(self.status_line())
            await self._stop.wait()
            self.notifier.stopping()
            log.info("stopping", inflight=len(self.server.tasks))
            # Stop taking queries, answer those in flight (bounded), then close; the stack
            # then stops the workers, flushes incident counts and closes the store.
            self.workers.broadcast("stop")
            await self.core.stop(DRAIN_SECONDS)
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
                source = None if self.config.source == "<embedded default>" else self.config.source
                try:
                    new = await asyncio.to_thread(load_config, source, self.overrides)
                except ConfigError as exc:
                    log.error("config_reload_failed", reason=reason, error=str(exc))
                    return False
                if new != self.config:
                    needs_restart = self.core.apply(new)
                    if needs_restart:
                        log.warning("restart_required", reason=reason, keys=needs_restart,
                                    detail="these settings change only when tiktokguard "
                                           "restarts")
                    self.incidents.settings = self.config.incidents
                    self.lists.wake.set()  # URL lists may have come or gone
                    await self._load_tokens()
                    log.info("config_reloaded", reason=reason, config=self.config.source)
                if self.core.backstop is not None:
                    self.core.backstop.request_check()  # the firewall may have been reloaded
                problem = self.core.reload_certificate()  # (a renewed certificate)
                if problem is not None:
                    log.error("tls_certificate_reload_failed", reason=reason, error=problem)
                return await self._reload_lists(reason)
            finally:
                self.notifier.ready(self.status_line())

    async def _reload_lists(self, reason: str) -> bool:
        try:
            matcher = await self.core.reload_lists()
        except ListError as exc:
            self.metrics.list_reload_errors.inc()
            log.error("blocklists_reload_failed", reason=reason, error=str(exc),
                      kept_rules=len(self.engine.matcher))
            return False
        # The workers re-read config and lists too; reported done when they all have.
        await self.workers.request("reload", self.config, seconds=10)
        self.metrics.blocklist_rules.set(len(matcher))
        self._lists_loaded()
        log.info("blocklists_reloaded", reason=reason, rules=len(matcher))
        return True

    def _lists_loaded(self) -> None:
        """Per-list figures of the lists just loaded: skipped lines (said once per load)."""
        engine = self.engine
        skipped: dict[str, int] = dict(engine.matcher.skipped)
        examples = list(engine.matcher.skipped_examples)
        if engine.doh is not None:
            skipped.update(engine.doh.skipped)
            examples += engine.doh.skipped_examples
        for source in list_sources(self.config.policy):
            if source.url:
                self.metrics.list_fetch_errors.labels(source.name)  # (at 0 from the start)
            self.metrics.list_skipped_lines.labels(source.name).set(skipped.get(source.name, 0))
        if any(skipped.values()):
            log.warning("blocklist_lines_skipped",
                        lists={name: n for name, n in skipped.items() if n}, examples=examples)

    async def reload_lists(self, reason: str) -> bool:
        """Re-read only the list files (API call, a list file changed on disk)."""
        async with self._reload_lock:
            return await self._reload_lists(reason)

    async def _watch_lists(self) -> None:
        while True:
            await asyncio.sleep(LIST_POLL_SECONDS)
            if list_stamp(list_paths(self.config.policy)) != self.core.list_stamp:
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

    def readiness(self) -> dict[str, tuple[bool, str]]:
        """Each component by name: (ready, state). Ready only when every one is."""
        components: dict[str, tuple[bool, str]] = {
            "listeners": (True, "bound") if self.core.listeners else (False, "not bound"),
            "lists": self._lists_readiness(),
            "store": self._store_readiness(),
            "upstreams": ((False, f"no upstream has answered for {UPSTREAM_READY_WINDOW:g} s "
                                  "while queries were failing")
                          if self.pool.failing_since(time.monotonic(), UPSTREAM_READY_WINDOW)
                          else (True, "answering")),
        }
        running = len(self.workers.workers) + 1
        components["workers"] = (running >= self.config.dns.workers,
                                 f"{running} of {self.config.dns.workers} DNS processes running")
        backstop = self.core.backstop
        if backstop is not None:
            # Not ready until its first check; a backend found unavailable is said, but does not
            # take DNS out of service (DNS blocking does not depend on it).
            components["backstop"] = (
                (False, "starting") if not backstop.started.is_set()
                else (True, "ready") if backstop.ready else (True, "unavailable, retrying"))
        return components

    def _store_readiness(self) -> tuple[bool, str]:
        store = self.store
        if store is None:
            return False, "not open"
        if store.up:
            return True, "open" if self.config.store.backend == "sqlite" else "connected"
        # Still ready: DNS decides from the devices as last known; writes answer 503.
        return True, (f"{DEGRADED}: the database is unreachable; deciding from the last known "
                      f"{len(self.devices.devices)} devices; device changes answer 503")

    def _lists_readiness(self) -> tuple[bool, str]:
        if self.list_error:
            return False, f"last reload failed: {self.list_error}"
        missing = self.engine.matcher.missing + (self.engine.doh.missing
                                                 if self.engine.doh is not None else ())
        failing = self.lists.errors()
        if missing:
            why = "; ".join(f"{url}: {failing.get(url, 'not fetched yet')}" for url in missing)
            return False, f"never fetched, not in force: {why}"
        state = f"{len(self.engine.matcher)} rules"
        if failing:
            state += "; last good copy in force for " + "; ".join(
                f"{url} (fetch failed: {error})" for url, error in failing.items())
        return True, state

    def readiness_problems(self) -> list[str]:
        return [f"{name}: {state}" for name, (ok, state) in self.readiness().items() if not ok]

    # -- what the API is given (api/app.py make_app) --------------------------------------------

    async def collect_metrics(self) -> bytes:
        await self.workers.report()  # every DNS process's counts, as of now
        self.refresh_gauges()
        return generate_latest(self.metrics.registry)

    async def sync_incidents(self) -> None:
        await self.workers.report()  # blocked queries the worker processes have not sent yet
        await self.incidents.flush()

    def decide(self, client: str, name: str, mac: str | None) -> Decision:
        """The decision a query for name from client (and mac) would get now. ValueError for a
        name that is not one."""
        return self.engine.decide_text(client, name, self.clock(), mac=mac)

    async def api_reload_lists(self, reason: str) -> tuple[bool, int, str | None]:
        await self.lists.fetch_all()  # URL lists too (conditional GETs: cheap when unchanged)
        ok = await self.reload_lists(reason)
        return ok, len(self.engine.matcher), self.list_error

    def status_line(self) -> str:
        degraded = "" if self.store is None or self.store.up else ", store unreachable (degraded)"
        return (f"serving: {len(self.engine.matcher)} rules, "
                f"{self.devices.active_count(self.clock())} allowlisted devices{degraded}")

    def refresh_gauges(self) -> None:
        self.metrics.allowlisted_devices.set(self.devices.active_count(self.clock()))
        backstop = self.core.backstop
        if backstop is not None:
            self.metrics.netfilter_entries.set(backstop.size())
            written = backstop.exempt_written
            self.metrics.netfilter_exempt_entries.set(len(written) if written else 0)
        self.metrics.blocklist_rules.set(len(self.engine.matcher))
