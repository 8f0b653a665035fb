"""The backstop's logic: which addresses to learn, when to write them, and the exemptions kept in
step with the device store. Kernel writes go through a KernelSets backend in a worker thread,
batched, off the DNS path; a failure is counted and logged, and DNS answers are never affected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tiktokguard.config import NetfilterConfig
from tiktokguard.dns.upstream import AllUpstreamsFailed, UpstreamPool
from tiktokguard.dns.wire import (
    RD,
    TYPE_A,
    TYPE_AAAA,
    RecordIndex,
    answer_addresses,
    question_addresses,
)
from tiktokguard.logs import get_logger
from tiktokguard.metrics import Metrics
from tiktokguard.netfilter.sets import Exemptions, KernelSets
from tiktokguard.policy.domains import DomainMatcher

FLUSH_SECONDS = 0.5
CHECK_SECONDS = 10.0  # the sets checked (there? made anew?) and failures retried this often
MAX_PENDING = 65_536  # addresses waiting for a write, at most (a backend down for long)
EARLY_NAMES = 1000  # names blocked before the backend was ready, kept to learn later
SHADOW_CONCURRENCY = 16
log = get_logger("tiktokguard.netfilter")


class Backstop:
    """Learns addresses of blocked names and keeps them in the kernel sets, in the background."""

    def __init__(self, settings: Callable[[], NetfilterConfig], backend: KernelSets,
                 metrics: Metrics, matcher: Callable[[], DomainMatcher],
                 pool: Callable[[], UpstreamPool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings  # [netfilter] as in force (a reload changes it)
        config = settings()
        self.backend = backend
        self.metrics = metrics
        self.matcher = matcher
        self.pool = pool
        self.clock = clock
        self.pending: dict[str, int] = {}  # address → timeout, waiting for the next write
        self.expires: dict[str, float] = {}  # what we believe the kernel holds, and until when
        self.shadowed: dict[bytes, float] = {}  # names resolved recently (no need to again)
        # Names blocked before the backend was ready (at start, or while it is unavailable):
        # learned once it is, instead of being lost. Bounded.
        self.early: dict[bytes, None] = {}
        self.tokens = float(config.shadow_per_second)
        self.last_refill = clock()
        self.shadow_tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        self.ready = False
        self.started = asyncio.Event()  # set after the first check and exemption write
        self.generation: object = None  # what ensure() last returned
        self._check_now = False
        self._rewrite = False  # (see request_check)
        self._flush_lock = asyncio.Lock()  # one write at a time: `expires` must be current
        # The main process (which owns the device store) sets this; workers leave it None.
        self.exemptions: Callable[[], Exemptions] | None = None
        self.exempt_written: Exemptions | None = None  # what the kernel holds, when known
        self._exempt_logged: Exemptions | None = None
        self._exempt_error: str | None = None
        self._exempt_lock = asyncio.Lock()

    @property
    def config(self) -> NetfilterConfig:
        return self.settings()

    # -- from the DNS path (sync, cheap) ------------------------------------------------------

    def answer(self, wire: bytes, index: RecordIndex) -> None:
        """An upstream answer for a listed name: keep its addresses."""
        if index.other_names:
            self._learn(wire, index)  # CNAMEs, or owners other than the question
        else:
            self._keep(question_addresses(wire, index))  # all the listed question's own

    def blocked(self, qname: bytes) -> None:
        """A managed client was blocked for qname: resolve it ourselves, in the background."""
        if not self.config.shadow_resolution:
            return
        if not self.ready:  # nowhere to put the addresses yet: remember the name (bounded)
            if len(self.early) < EARLY_NAMES:
                self.early[qname] = None
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
            self.answer(reply.wire, reply.index)  # (index_response has checked every record)

    def _learn(self, wire: bytes, index: RecordIndex) -> None:
        """An answer with CNAMEs or other owners: only the addresses of listed owners count."""
        try:
            records = answer_addresses(wire, index)
        except ValueError:
            return  # (the pipeline answers such a reply SERVFAIL; nothing to learn)
        match = self.matcher().match
        # A CDN or other shared name behind a CNAME never goes into the sets.
        self._keep([(address, ttl) for owner, address, ttl in records
                    if match(owner) is not None])

    def _keep(self, found: list[tuple[str, int]]) -> None:
        """Addresses with their TTLs, for the next write (timeouts kept within bounds)."""
        if not found:
            return
        low, high = self.config.min_timeout, self.config.max_timeout
        pending = self.pending
        for address, ttl in found:
            if len(pending) >= MAX_PENDING and address not in pending:
                break
            timeout = low if ttl < low else high if ttl > high else ttl
            if pending.get(address, 0) < timeout:
                pending[address] = timeout
        self.wake.set()

    # -- background ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self.check_sets()
        await self.sync_exemptions()
        self.started.set()
        while True:
            try:
                async with asyncio.timeout(CHECK_SECONDS):
                    await self.wake.wait()
            except TimeoutError:
                self._check_now = True
            self.wake.clear()
            if self._check_now:
                self._check_now = False
                await self.check_sets()
            if self.ready:
                await self.flush()
                await self.sync_exemptions()  # nothing to do unless something changed or failed
            await asyncio.sleep(FLUSH_SECONDS)  # batch what arrives meanwhile

    def request_check(self) -> None:
        """Check the sets now (SIGHUP: e.g. after the firewall was reloaded). A backend that
        cannot tell whether its sets were made anew (ipset) writes everything again."""
        self._check_now = self._rewrite = True
        self.wake.set()

    async def check_sets(self) -> None:
        """Create the sets when missing, and notice when they were made anew: a firewall reload
        that starts with `flush ruleset` (as Debian's nftables.conf does) empties everything, and
        then all we know is written again. Retries a backend that was unavailable."""
        try:
            generation = await asyncio.to_thread(self.backend.ensure)
        except Exception as exc:
            self.metrics.stats.netfilter["errors"] += 1
            if self.ready or not self.started.is_set():  # log changes of state, not every retry
                log.error("netfilter_unavailable", backend=self.config.backend, error=str(exc))
            self.ready = False
            return
        rewrite, self._rewrite = self._rewrite, False
        recreated = self.ready and (generation != self.generation if generation is not None
                                    else rewrite)
        if not self.ready:
            # queued: names blocked before now, learned from here on
            log.info("netfilter_ready", backend=self.config.backend, queued=len(self.early))
        if not self.ready or generation is None or recreated:
            self.exempt_written = None  # unknown (ipset) or gone: write the exemptions again
        self.generation = generation
        self.ready = True
        early, self.early = self.early, {}
        for qname in early:  # blocked while we were not ready: learn them now
            self.blocked(qname)
        if recreated:
            now = self.clock()
            for address, until in self.expires.items():
                if until > now:
                    self.pending[address] = max(self.pending.get(address, 0),
                                                int(until - now) + 1)
            self.expires = {}
            await self.flush()
            await self.sync_exemptions()
            log.warning("netfilter_sets_restored", backend=self.config.backend,
                        addresses=self.size(),
                        exemptions=len(self.exempt_written) if self.exempt_written else 0)

    async def sync_exemptions(self) -> None:
        """Bring the exemption sets in line with the allowlisted devices (after every device
        change, expiry included). Nothing is written when nothing changed."""
        if self.exemptions is None or not self.ready:
            return  # run() syncs once the sets exist
        async with self._exempt_lock:
            wanted = self.exemptions()
            if wanted == self.exempt_written:
                return
            try:
                await asyncio.to_thread(self.backend.exempt, wanted)
            except Exception as exc:
                self.exempt_written = None  # unknown: write again on the next try
                self.metrics.stats.netfilter["errors"] += 1
                if str(exc) != self._exempt_error:  # retried every 10 s: said once per cause
                    self._exempt_error = str(exc)
                    log.error("netfilter_exempt_failed", backend=self.config.backend,
                              error=str(exc), retry_seconds=CHECK_SECONDS)
                return
            self._exempt_error = None
            self.exempt_written = wanted
            if wanted != self._exempt_logged:  # not each periodic rewrite (ipset)
                self._exempt_logged = wanted
                log.info("netfilter_exemptions_updated", networks_v4=len(wanted.v4),
                         networks_v6=len(wanted.v6), macs=len(wanted.macs))

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
        v4 = [(a, t) for a, t in todo.items() if ":" not in a]  # (text from inet_ntop/ipaddress)
        v6 = [(a, t) for a, t in todo.items() if ":" in a]
        try:
            await asyncio.to_thread(self.backend.add, v4, v6, refresh)
        except Exception as exc:
            self.metrics.stats.netfilter["errors"] += 1
            log.error("netfilter_write_failed", backend=self.config.backend, error=str(exc),
                      addresses=len(todo))
            for address in refresh:  # perhaps gone from the kernel: next time, a plain add
                self.expires.pop(address, None)
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


__all__ = ["Backstop"]
