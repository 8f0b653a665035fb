"""Incidents: blocked queries of managed clients, aggregated per (client, rule) and window.

The policy treats violations as IT offences and has incidents reported to the IT department
(shared/policy, "Related policies" and "Second phase"). The SOC needs one event per incident, not
one per packet: the first blocked query of a (client, rule) opens an incident; further ones within
`incidents.window_seconds` raise its count. A new incident is logged once as a JSON line, stored
(bounded retention) and optionally POSTed to a webhook. The per-query part (`blocked`) only
touches a dict; everything else happens in the background and never delays an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dnslib

from tiktokguard.devices.store import Store
from tiktokguard.dns.wire import Query
from tiktokguard.logs import get_logger
from tiktokguard.metrics import Metrics

FLUSH_SECONDS = 1.0
PRUNE_SECONDS = 3600.0
WEBHOOK_QUEUE = 1000
WEBHOOK_TRIES = 4
WEBHOOK_TIMEOUT = 5.0
MAX_OPEN = 100_000  # open (client, rule) pairs kept in memory at most
log = get_logger("tiktokguard.incidents")


def qtype_name(qtype: int) -> str:
    return str(dnslib.QTYPE.get(qtype, str(qtype)))


class BlockedBatch:
    """A worker's side of incidents: blocked queries summed per (client, rule) until the main
    process takes them (every second) and merges them into its aggregator."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], list[Any]] = {}

    def blocked(self, client_ip: str, mac: str | None, query: Query, rule: str,
                now: float) -> None:
        entry = self.entries.get((client_ip, rule))
        if entry is None:
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


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


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
                "first_seen": rfc3339(self.first_seen), "last_seen": rfc3339(self.last_seen)}


class IncidentAggregator:
    """Aggregation (pure, time passed in) plus the background work of emitting incidents."""

    def __init__(self, window_seconds: float, metrics: Metrics, webhook_url: str = "",
                 retention_days: int = 90, max_rows: int = 100_000,
                 describe: Callable[[str, str | None], str | None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.window = window_seconds
        self.metrics = metrics
        self.webhook_url = webhook_url
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.describe = describe
        self.clock = clock
        self.store: Store | None = None
        self.open: dict[tuple[str, str], Incident] = {}
        self._new: list[Incident] = []
        self._dirty: dict[str, Incident] = {}
        self._wake = asyncio.Event()
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WEBHOOK_QUEUE)
        self._flush_lock = asyncio.Lock()

    # -- per query (hot path) ---------------------------------------------------------------------

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
        if len(self.open) >= MAX_OPEN:
            self._expire(first)
        incident = Incident(secrets.token_hex(8), client_ip, mac, name, rule, qtype, count,
                            first, last)
        self.open[client_ip, rule] = incident
        self._new.append(incident)
        self._dirty[incident.incident_id] = incident
        self.metrics.incidents.inc()
        self._wake.set()

    def _expire(self, now: float) -> None:
        """Forget incidents whose window has closed (their final count is already dirty)."""
        for key in [k for k, i in self.open.items() if now - i.first_seen >= self.window]:
            del self.open[key]

    # -- background -------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Log and queue the new incidents, write every changed one to the store."""
        async with self._flush_lock:
            new, self._new = self._new, []
            dirty, self._dirty = self._dirty, {}
            for incident in new:
                if self.describe is not None:
                    incident.device_name = self.describe(incident.client_ip, incident.client_mac)
                event = incident.to_json()
                log.warning("policy_violation", **{k: v for k, v in event.items()
                                                   if k != "device_name" or v is not None})
                if self.webhook_url:
                    payload = {"event": "policy_violation", "timestamp": rfc3339(self.clock()),
                               **event}
                    try:
                        self._queue.put_nowait(payload)
                    except asyncio.QueueFull:
                        self.metrics.webhook_dropped.labels("queue_full").inc()
            if dirty and self.store is not None:
                await self.store.save_incidents([i.to_json() for i in dirty.values()])
            self._expire(self.clock())

    async def run(self) -> None:
        """Flush (at most once a second, right away on a new incident) and prune, until
        cancelled; a last flush on the way out writes the open counts."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
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
                except Exception as exc:  # a full disk must not stop DNS; say so and go on
                    log.error("incident_flush_failed", error=str(exc))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())

    async def prune(self) -> int:
        assert self.store is not None
        now = self.clock()
        before = datetime.fromtimestamp(now, UTC) - timedelta(days=self.retention_days)
        return await self.store.prune_incidents(rfc3339(before.timestamp()), self.max_rows)

    async def webhook_worker(self) -> None:
        """POST each queued incident; retries with backoff, drops counted, never blocks DNS."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                event = await self._queue.get()
                for attempt in range(WEBHOOK_TRIES):
                    try:
                        async with session.post(self.webhook_url, json=event) as response:
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
                    log.warning("incident_webhook_dropped", incident_id=event["incident_id"],
                                reason=reason)
