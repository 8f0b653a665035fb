"""Network-level backstop: the addresses of blocked names go into kernel sets that a firewall rule
consults, so a managed device that bypasses DNS (its own DoH, hard-coded resolvers, cached
addresses) still cannot reach TikTok.

Addresses are learned from answers that tiktokguard forwards for listed names (to unmanaged
clients and allowlisted devices) and by shadow resolution: when a managed client is blocked, the
daemon resolves the name upstream itself, in the background. Only A/AAAA records whose owner name
the list blocks are used: a CDN address reached through a CNAME is shared with unrelated services
and is never added (README, "Network-level backstop").

Kernel writes go through pyroute2 in a worker thread, batched, off the DNS path; a failure is
counted and logged, and DNS answers are never affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable
from typing import Protocol

import dnslib

from tiktokguard.config import NetfilterConfig
from tiktokguard.dns.upstream import AllUpstreamsFailed, UpstreamPool
from tiktokguard.dns.wire import RD, TYPE_A, TYPE_AAAA
from tiktokguard.logs import get_logger
from tiktokguard.metrics import Metrics
from tiktokguard.policy.domains import DomainMatcher

FLUSH_SECONDS = 0.5
SHADOW_CONCURRENCY = 16
log = get_logger("tiktokguard.netfilter")

Element = tuple[str, int]  # address, timeout in seconds


class KernelSets(Protocol):
    """A backend: creates its sets, adds (or refreshes) timed elements."""

    def ensure(self) -> None: ...

    def add(self, v4: list[Element], v6: list[Element], refresh: set[str]) -> None: ...


class NftablesSets:
    """`table inet <table>` with two timed sets, written over netlink with pyroute2."""

    def __init__(self, table: str, set_v4: str, set_v6: str, default_timeout: int) -> None:
        self.table = table
        self.names = {4: set_v4, 6: set_v6}
        self.default_timeout = default_timeout

    def _nft(self):  # type: ignore[no-untyped-def]
        from pyroute2.nftables.main import NFTables

        return NFTables(nfgen_family=1)  # NFPROTO_INET: one table for IPv4 and IPv6

    def ensure(self) -> None:
        nft = self._nft()
        try:
            existing = {t.get_attr("NFTA_TABLE_NAME") for t in nft.get_tables()}
            if self.table not in existing:
                nft.table("add", name=self.table)
            sets = {s.get_attr("NFTA_SET_NAME") for s in nft.get_sets()
                    if s.get_attr("NFTA_SET_TABLE") == self.table}
            for version, name in self.names.items():
                if name in sets:
                    continue
                key = "ipv4_addr" if version == 4 else "ipv6_addr"
                with contextlib.suppress(TypeError):
                    # pyroute2 0.9.x raises TypeError *after* the kernel accepted the new set
                    # (it iterates a list as an async iterator); what the kernel holds is
                    # checked just below.
                    nft.sets("add", table=self.table, name=name, key_type=key,
                             timeout=self.default_timeout * 1000)
            sets = {s.get_attr("NFTA_SET_NAME") for s in nft.get_sets()
                    if s.get_attr("NFTA_SET_TABLE") == self.table}
            missing = set(self.names.values()) - sets
            if missing:
                raise OSError(f"nftables sets not created: {sorted(missing)}")
        finally:
            nft.close()

    def add(self, v4: list[Element], v6: list[Element], refresh: set[str]) -> None:
        from pyroute2.nftables.main import NFTSet

        nft = self._nft()
        try:
            for version, elements in ((4, v4), (6, v6)):
                if not elements:
                    continue
                # set_elems wants an NFTSet object: given a name, pyroute2 0.9.x looks the set
                # up with a call that fails.
                target = NFTSet(table=self.table, name=self.names[version],
                                key_type="ipv4_addr" if version == 4 else "ipv6_addr")
                again = [{"value": a} for a, _t in elements if a in refresh]
                if again:
                    # An element's timeout cannot be changed in place: delete and add again.
                    nft.set_elems("del", set=target, elements=again)
                nft.set_elems("add", set=target,
                              elements=[{"value": a, "timeout": t * 1000} for a, t in elements])
        finally:
            nft.close()


class IpsetSets:
    """Two ipsets (hash:ip, family inet and inet6) with timeouts, through pyroute2's IPSet."""

    def __init__(self, set_v4: str, set_v6: str, default_timeout: int) -> None:
        self.names = {4: set_v4, 6: set_v6}
        self.default_timeout = default_timeout

    def ensure(self) -> None:
        import socket

        from pyroute2 import IPSet

        with IPSet() as ipset:
            for version, name in self.names.items():
                family = socket.AF_INET if version == 4 else socket.AF_INET6
                try:
                    ipset.create(name, stype="hash:ip", family=family,
                                 timeout=self.default_timeout, exclusive=False)
                except Exception as exc:  # already there with other options, no permission
                    if not ipset.list(name):
                        raise OSError(f"ipset {name}: {exc}") from None

    def add(self, v4: list[Element], v6: list[Element], refresh: set[str]) -> None:
        import socket

        from pyroute2 import IPSet

        with IPSet() as ipset:
            for version, elements in ((4, v4), (6, v6)):
                family = socket.AF_INET if version == 4 else socket.AF_INET6
                for address, timeout in elements:
                    # exclusive=False: an existing entry gets the new timeout.
                    ipset.add(self.names[version], address, family=family, timeout=timeout,
                              exclusive=False)


def make_backend(config: NetfilterConfig) -> KernelSets | None:
    if config.backend == "nftables":
        return NftablesSets(config.table, config.set_v4, config.set_v6, config.default_timeout)
    if config.backend == "ipset":
        return IpsetSets(config.set_v4, config.set_v6, config.default_timeout)
    return None


class Backstop:
    """Learns addresses of blocked names and keeps them in the kernel sets, in the background."""

    def __init__(self, config: NetfilterConfig, backend: KernelSets, metrics: Metrics,
                 matcher: Callable[[], DomainMatcher], pool: Callable[[], UpstreamPool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.matcher = matcher
        self.pool = pool
        self.clock = clock
        self.pending: dict[str, int] = {}  # address → timeout, waiting for the next write
        self.expires: dict[str, float] = {}  # what we believe the kernel holds, and until when
        self.shadowed: dict[bytes, float] = {}  # names resolved recently (no need to again)
        self.tokens = float(config.shadow_per_second)
        self.last_refill = clock()
        self.shadow_tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        self.ready = False
        self._flush_lock = asyncio.Lock()  # one write at a time: `expires` must be current

    # -- from the DNS path (sync, cheap) ------------------------------------------------------

    def answer(self, wire: bytes) -> None:
        """An upstream answer for a listed name: keep its addresses."""
        self._learn(wire)

    def blocked(self, qname: bytes) -> None:
        """A managed client was blocked for qname: resolve it ourselves, in the background."""
        if not self.config.shadow_resolution:
            return
        now = self.clock()
        if self.shadowed.get(qname, 0.0) > now:
            return
        self.tokens = min(float(self.config.shadow_per_second),
                          self.tokens + (now - self.last_refill) * self.config.shadow_per_second)
        self.last_refill = now
        if self.tokens < 1 or len(self.shadow_tasks) >= SHADOW_CONCURRENCY:
            self.metrics.stats.netfilter["shadow_skipped"] += 1
            return
        self.tokens -= 1
        self.shadowed[qname] = now + self.config.min_timeout
        if len(self.shadowed) > 100_000:
            self.shadowed = {k: v for k, v in self.shadowed.items() if v > now}
        task = asyncio.get_running_loop().create_task(self._shadow(qname))
        self.shadow_tasks.add(task)
        task.add_done_callback(self.shadow_tasks.discard)

    async def _shadow(self, qname: bytes) -> None:
        for qtype in (TYPE_A, TYPE_AAAA):
            try:
                reply = await self.pool().resolve(qname, qtype, 1, RD, False)
            except AllUpstreamsFailed:
                return
            self.metrics.stats.netfilter["shadow_resolved"] += 1
            self._learn(reply.wire)

    def _learn(self, wire: bytes) -> None:
        try:
            message = dnslib.DNSRecord.parse(wire)
        except Exception:  # dnslib raises several types on odd input; nothing to learn then
            return
        matcher = self.matcher()
        low, high = self.config.min_timeout, self.config.max_timeout
        learned = False
        for rr in message.rr:
            if rr.rtype not in (dnslib.QTYPE.A, dnslib.QTYPE.AAAA):
                continue
            if matcher.match_text(str(rr.rname)) is None:
                continue  # a CDN or other shared name behind a CNAME: never into the sets
            timeout = max(low, min(high, int(rr.ttl)))
            address = str(rr.rdata)
            self.pending[address] = max(timeout, self.pending.get(address, 0))
            learned = True
        if learned:
            self.wake.set()

    # -- background ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await asyncio.to_thread(self.backend.ensure)
            self.ready = True
            log.info("netfilter_ready", backend=self.config.backend)
        except Exception as exc:
            self.metrics.stats.netfilter["errors"] += 1
            log.error("netfilter_unavailable", backend=self.config.backend, error=str(exc))
            return  # DNS goes on; the sets stay as they are
        while True:
            await self.wake.wait()
            self.wake.clear()
            await self.flush()
            await asyncio.sleep(FLUSH_SECONDS)  # batch what arrives meanwhile

    async def flush(self) -> None:
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        now = self.clock()
        for address in [a for a, until in self.expires.items() if until <= now]:
            del self.expires[address]
            self.metrics.stats.netfilter["expired"] += 1
        if not self.pending:
            return
        batch, self.pending = self.pending, {}
        # An element still well within its timeout is left alone; one past half is refreshed.
        todo = {a: t for a, t in batch.items() if self.expires.get(a, 0.0) < now + t / 2}
        if not todo:
            return
        refresh = {a for a in todo if a in self.expires}
        v4 = [(a, t) for a, t in todo.items() if ipaddress.ip_address(a).version == 4]
        v6 = [(a, t) for a, t in todo.items() if ipaddress.ip_address(a).version == 6]
        try:
            await asyncio.to_thread(self.backend.add, v4, v6, refresh)
        except Exception as exc:
            self.metrics.stats.netfilter["errors"] += 1
            log.error("netfilter_write_failed", backend=self.config.backend, error=str(exc),
                      addresses=len(todo))
            return
        for address, timeout in todo.items():
            self.expires[address] = now + timeout
        self.metrics.stats.netfilter["added"] += len(todo) - len(refresh)
        self.metrics.stats.netfilter["refreshed"] += len(refresh)
        log.info("netfilter_sets_updated", added=len(todo) - len(refresh),
                 refreshed=len(refresh), size=len(self.expires))

    def size(self) -> int:
        now = self.clock()
        return sum(1 for until in self.expires.values() if until > now)
