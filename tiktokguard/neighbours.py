"""Client MACs from the kernel neighbour table (pyroute2), for resolvers on the clients' L2 segment.

Look-ups are dict reads; the table is dumped over netlink in a worker thread in the background
(every few seconds while some device is listed by MAC, and soon after an unknown client asks), so
the event loop never waits on the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from tiktokguard.logs import get_logger
from tiktokguard.metrics import Metrics

# NUD states whose link-layer address is usable (linux/neighbour.h).
NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE, NUD_PERMANENT, NUD_NOARP = (
    0x02, 0x04, 0x08, 0x10, 0x80, 0x40)
_USABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP
MIN_REFRESH_GAP = 1.0
log = get_logger("tiktokguard.neighbours")


def dump_neighbours(netns: str | None = None) -> dict[str, str]:
    """IP → MAC of every usable neighbour entry (blocking: call it from a thread)."""
    from pyroute2 import IPRoute, NetNS

    table: dict[str, str] = {}
    with (NetNS(netns) if netns else IPRoute()) as ipr:
        for message in ipr.get_neighbours():
            if not message["state"] & _USABLE:
                continue
            ip = message.get_attr("NDA_DST")
            mac = message.get_attr("NDA_LLADDR")
            if ip and mac and mac != "00:00:00:00:00:00":
                table[ip] = mac.lower()
    return table


class NeighbourTable:
    """IP → MAC, refreshed in the background.

    A client that is about to be blocked and whose address the last dump did not have may be a
    social media device that just joined the segment: the resolver waits (bounded) for one fresh
    dump before blocking it, so a device is not handed a block answer it would cache. Addresses
    a dump did not have are remembered until the next dump, so each waits at most once per dump.
    """

    def __init__(self, metrics: Metrics, wanted: Callable[[], bool],
                 refresh_seconds: float = 5.0,
                 dump: Callable[[], dict[str, str]] = dump_neighbours) -> None:
        self.metrics = metrics
        self.wanted = wanted  # is any device listed by MAC? Otherwise nothing is read.
        self.refresh_seconds = refresh_seconds
        self.dump = dump
        self.table: dict[str, str] = {}
        self._absent: set[str] = set()
        self._last = 0.0
        self._wake = asyncio.Event()
        self._pending: asyncio.Future[None] | None = None

    def mac_of(self, client_ip: str) -> str | None:
        return self.table.get(client_ip)

    def unknown(self, client_ip: str) -> bool:
        """Not in the table, and not known to be absent since the last dump."""
        return client_ip not in self.table and client_ip not in self._absent

    async def learn(self, client_ip: str, wait: float = 0.25) -> str | None:
        """The client's MAC after a fresh dump (shared by concurrent callers, bounded)."""
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self.refresh())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await asyncio.shield(self._pending)
        mac = self.table.get(client_ip)
        if mac is None:
            self._absent.add(client_ip)
        return mac

    def changed(self) -> None:
        """Devices changed: read the table again soon (a MAC may now matter)."""
        self._wake.set()

    async def refresh(self) -> None:
        self._last = time.monotonic()
        try:
            self.table = await asyncio.to_thread(self.dump)
            self._absent = set()
        except Exception as exc:  # netlink refused (no permission, no netlink): keep going
            self.metrics.stats.neighbour_errors += 1
            log.warning("neighbour_table_unreadable", error=str(exc))

    async def run(self) -> None:
        while True:
            if self.wanted():
                await self.refresh()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_seconds):
                    await self._wake.wait()
            self._wake.clear()
            gap = MIN_REFRESH_GAP - (time.monotonic() - self._last)
            if gap > 0:
                await asyncio.sleep(gap)
