"""Incidents: blocked queries of managed clients, aggregated per (client, rule) and window.

The policy treats violations as IT offences and has incidents reported to the IT department
(docs/policy.md: "Related policies" and "Second phase"). The SOC needs one event per incident, not
one per packet: the first blocked query of a (client, rule) opens an incident; further ones within
`incidents.window_seconds` raise its count. A new incident is logged once as a JSON line, stored
(bounded retention) and optionally POSTed to a webhook. The per-query part (`blocked`) only
touches a dict; everything else happens in the background and never delays an answer.

Bounded (issue: one client must not take the resolver down): open incidents live in an
OrderedDict in the order they were opened, so the ones whose window has closed are always at
the front and are forgotten from there, O(1) per blocked query however many are open. At most
`max_open` are open at once; past that a blocked query of a new (client, rule) opens nothing,
is counted (`tiktokguard_incidents_overflow_total`) and summed into one `incident_storm` event a
window, which tells the SOC that something floods, and how much, without a line per client.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dnslib

from tiktokguard import rfc3339
from tiktokguard.config import IncidentsConfig
from tiktokguard.devices.store import Store, StoreUnavailable
from tiktokguard.dns.wire import Query
from tiktokguard.logs import get_logger
from tiktokguard.metrics import Metrics

FLUSH_SECONDS = 1.0
PRUNE_SECONDS = 3600.0
WEBHOOK_QUEUE = 1000
WEBHOOK_TRIES = 4
WEBHOOK_TIMEOUT = 5.0
MAX_OPEN = 100_000  # open (client, rule) pairs kept in memory at most
LOG_BATCH = 500  # new incidents logged between two yields to the event loop
log = get_logger("tiktokguard.incidents")


def qtype_name(qtype: int) -> str:
    return str(dnslib.QTYPE.get(qtype, str(qtype)))


class BlockedBatch:
    """A worker's side of incidents: blocked queries summed per (client, rule) until the main
    process takes them (every second) and merges them into its aggregator."""

    def __init__(self, max_entries: int = MAX_OPEN) -> None:
        self.entries: dict[tuple[str, str], list[Any]] = {}
        self.max_entries = max_entries

    def blocked(self, client_ip: str, mac: str | None, query: Query, rule: str,
                now: float) -> None:
        entry = self.entries.get((client_ip, rule))
        if entry is None:
            if len(self.entries) >= self.max_entries:
                return  # (the main process's table is full long before this one fills)
            self.entries[client_ip, rule] = [mac, query.name, qtype_name(query.qtype), 1, now,
                                             now]
        else:
            entry[3] += 1
            entry[5] = now

    def take(self) -> list[tuple[Any, ...]]:
        """(client_ip, mac, name, rule, qtype, count, first, last) for each pair, and reset."""
        entries, self.entries = self.entries, {}
        return [(ip, mac, name, rule, qtype, count, first, last)
                for (ip, rule), (mac, name, qtype, count, first, last) in entries.items()]


@dataclass(slots=True)
class Incident:
    incident_id: str
    client_ip: str
    client_mac: str | None
    name: str
    rule: str
    qtype: str
    count: int
    first_seen: float
    last_seen: float
    device_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"incident_id": self.incident_id, "client_ip": self.client_ip,
                "client_mac": self.client_mac, "device_name": self.device_name,
                "name": self.name, "rule": self.rule, "qtype": self.qtype, "count": self.count,
                "first_seen": rfc3339.format_time(self.first_seen),
                "last_seen": rfc3339.format_time(self.last_seen)}


class IncidentAggregator:
    """Aggregation (pure, time passed in) plus the background work of emitting incidents."""

    def __init__(self, settings: IncidentsConfig, metrics: Metrics,
                 describe: Callable[[str, str | None], str | None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        # [incidents] as in force; a reload replaces it whole (one assignment).
        self.settings = settings
        self.metrics = metrics
        self.describe = describe
        self.clock = clock
        self.store: Store | None = None
        # (client, rule) → its incident, oldest first (see the module's docstring)
        self.open: OrderedDict[tuple[str, str], Incident] = OrderedDict()
        self._new: list[Incident] = []
        self._dirty: dict[str, Incident] = {}
        self._wake = asyncio.Event()
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WEBHOOK_QUEUE)
        self._flush_lock = asyncio.Lock()
        self._overflow = 0  # blocked queries that found the table full, since the last storm event
        self._overflow_rules: dict[str, int] = {}  # the same by rule (bounded by the lists)
        self._overflow_since = 0.0
        self._storm_logged = float("-inf")

    # -- per query (hot path) ---------------------------------------------------------------------

    @property
    def window(self) -> int:
        return self.settings.window_seconds

    @property
    def max_open(self) -> int:
        return self.settings.max_open

    def blocked(self, client_ip: str, mac: str | None, query: Query, rule: str,
                now: float) -> None:
        incident = self.open.get((client_ip, rule))
        if incident is not None and now - incident.first_seen < self.window:
            incident.count += 1
            incident.last_seen = now
            self._dirty[incident.incident_id] = incident
            return
        self._open(client_ip, mac, query.name, rule, qtype_name(query.qtype), 1, now, now)

    def merge(self, client_ip: str, mac: str | None, name: str, rule: str, qtype: str,
              count: int, first: float, last: float) -> None:
        """Blocked queries summed elsewhere (a worker process, BlockedBatch)."""
        incident = self.open.get((client_ip, rule))
        if incident is not None and first - incident.first_seen < self.window:
            incident.count += count
            incident.last_seen = max(incident.last_seen, last)
            self._dirty[incident.incident_id] = incident
            return
        self._open(client_ip, mac, name, rule, qtype, count, first, last)

    def _open(self, client_ip: str, mac: str | None, name: str, rule: str, qtype: str,
              count: int, first: float, last: float) -> None:
        key = (client_ip, rule)
        # A closed window's incident of the same pair leaves its place at the front for a new
        # one at the back (its final count is already dirty, to be written).
        self.open.pop(key, None)
        self._expire(first)
        if len(self.open) >= self.max_open:
            if not self._overflow:
                self._overflow_since = first
            self._overflow += count
            self._overflow_rules[rule] = self._overflow_rules.get(rule, 0) + count
            self.metrics.incidents_overflow.inc(count)
            self._wake.set()
            return
        incident = Incident(secrets.token_hex(8), client_ip, mac, name, rule, qtype, count,
                            first, last)
        self.open[key] = incident
        self._new.append(incident)
        self._dirty[incident.incident_id] = incident
        self.metrics.incidents.inc()
        self._wake.set()

    def _expire(self, now: float) -> None:
        """Forget incidents whose window has closed: they are at the front, oldest first, so
        this stops at the first one still open (amortised O(1) per call)."""
        open_ = self.open
        window = self.window
        while open_:
            key, incident = next(iter(open_.items()))
            if now - incident.first_seen < window:
                return
            del open_[key]

    def restore(self, rows: list[dict[str, Any]], now: float) -> int:
        """Incidents from the store whose window is still open at now, back in the table, so
        that a restart does not open a second incident for the same (client, rule) inside the
        window (they are neither logged nor posted again). Returns how many."""
        restored = 0
        for row in sorted(rows, key=lambda r: r["first_seen"]):
            first = rfc3339.to_timestamp(row["first_seen"])
            if now - first >= self.window or len(self.open) >= self.max_open:
                continue
            key = (row["client_ip"], row["rule"])
            self.open.pop(key, None)
            self.open[key] = Incident(
                row["incident_id"], row["client_ip"], row["client_mac"], row["name"],
                row["rule"], row["qtype"], int(row["count"]), first,
                rfc3339.to_timestamp(row["last_seen"]), row.get("device_name"))
            restored += 1
        return restored

    async def restore_from_store(self) -> int:
        if self.store is None:
            return 0
        now = self.clock()
        rows = await self.store.incidents(rfc3339.format_time(now - self.window), None, None,
                                          self.max_open, 0)
        return self.restore(rows, now)

    def _storm_event(self, now: float) -> dict[str, Any] | None:
        """One `incident_storm` event a window at most, while new incidents find the table
        full: how many blocked queries went untracked, since when, and under which rules."""
        if not self._overflow or now - self._storm_logged < self.window:
            return None
        top = sorted(self._overflow_rules.items(), key=lambda item: -item[1])[:10]
        event = {"untracked_queries": self._overflow, "open_incidents": len(self.open),
                 "max_open": self.max_open, "since": rfc3339.format_time(self._overflow_since),
                 "rules": dict(top)}
        self._overflow = 0
        self._overflow_rules = {}
        self._storm_logged = now
        return event

    # -- background -------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Log and queue the new incidents, write every changed one to the store."""
        async with self._flush_lock:
            new, self._new = self._new, []
            dirty, self._dirty = self._dirty, {}
            for number, incident in enumerate(new, start=1):
                if self.describe is not None:
                    incident.device_name = self.describe(incident.client_ip, incident.client_mac)
                event = incident.to_json()
                log.warning("policy_violation", **{k: v for k, v in event.items()
                                                   if k != "device_name" or v is not None})
                self._post("policy_violation", event)
                if number % LOG_BATCH == 0:
                    await asyncio.sleep(0)  # a burst of new incidents must not stall DNS
            storm = self._storm_event(self.clock())
            if storm is not None:
                log.warning("incident_storm", **storm)
                self._post("incident_storm", storm)
            if dirty and self.store is not None:
                try:
                    await self.store.save_incidents([i.to_json() for i in dirty.values()])
                except Exception:
                    # Written at the next flush (the store may be back by then); bounded by
                    # the open-incident table, since only counts of live incidents change.
                    for key, incident in dirty.items():
                        self._dirty.setdefault(key, incident)
                    if len(self._dirty) > self.max_open:
                        for key in list(self._dirty)[:len(self._dirty) - self.max_open]:
                            del self._dirty[key]
                    raise
            self._expire(self.clock())

    def _post(self, kind: str, event: dict[str, Any]) -> None:
        if not self.settings.webhook_url:
            return
        payload = {"event": kind, "timestamp": rfc3339.format_time(self.clock()), **event}
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.metrics.webhook_dropped.labels("queue_full").inc()

    async def run(self) -> None:
        """Flush (at most once a second, right away on a new incident) and prune, until
        cancelled; a last flush on the way out writes the open counts."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        failing: str | None = None
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FLUSH_SECONDS):
                        await self._wake.wait()
                self._wake.clear()
                try:
                    await self.flush()
                    if loop.time() >= next_prune and self.store is not None:
                        await self.prune()
                        next_prune = loop.time() + PRUNE_SECONDS
                    failing = None
                except Exception as exc:  # a full disk must not stop DNS; say so and go on
                    # Once per cause, not every second (retried). A shared store that is down
                    # has said so itself (store_unavailable), and these wait for it.
                    if str(exc) != failing and not isinstance(exc, StoreUnavailable):
                        log.error("incident_flush_failed", error=str(exc))
                    failing = str(exc)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())

    async def prune(self) -> int:
        assert self.store is not None
        now = self.clock()
        before = now - self.settings.retention_days * 86_400
        return await self.store.prune_incidents(rfc3339.format_time(before), self.settings.max_rows)

    async def webhook_worker(self) -> None:
        """POST each queued incident; retries with backoff, drops counted, never blocks DNS."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                event = await self._queue.get()
                for attempt in range(WEBHOOK_TRIES):
                    try:
                        async with session.post(self.settings.webhook_url, json=event) as response:
                            if response.status < 300:
                                self.metrics.webhook_sent.inc()
                                break
                            reason = f"http_{response.status // 100}xx"
                    except (aiohttp.ClientError, TimeoutError, OSError):
                        reason = "unreachable"
                    if attempt + 1 < WEBHOOK_TRIES:
                        await asyncio.sleep(0.5 * 2 ** attempt)
                else:
                    self.metrics.webhook_dropped.labels(reason).inc()
                    log.warning("incident_webhook_dropped", reason=reason,
                                incident_id=event.get("incident_id"), kind=event["event"])
