"""Network-level backstop: the addresses of blocked names go into kernel sets that a firewall rule
consults, so a managed device that bypasses DNS (its own DoH, hard-coded resolvers, cached
addresses) still cannot reach TikTok.

Addresses are learned from answers that tiktokguard forwards for listed names (to unmanaged
clients and allowlisted devices) and by shadow resolution: when a managed client is blocked, the
daemon resolves the name upstream itself, in the background. Only A/AAAA records whose owner name
the list blocks are used: a CDN address reached through a CNAME is shared with unrelated services
and is never added (README, "Network-level backstop").

A second group of sets, the exemptions, holds the allowlisted social media devices (their
addresses and CIDRs, and their MACs), rewritten as a whole in one kernel transaction whenever a
device changes, so a firewall rule can let them through (systemd/tiktokguard-nftables.conf).

Kernel writes go through pyroute2 in a worker thread, batched, off the DNS path; a failure is
counted and logged, and DNS answers are never affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

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
from tiktokguard.policy.clients import Device
from tiktokguard.policy.domains import DomainMatcher

FLUSH_SECONDS = 0.5
CHECK_SECONDS = 10.0  # the sets checked (there? made anew?) and failures retried this often
MAX_PENDING = 65_536  # addresses waiting for a write, at most (a backend down for long)
EARLY_NAMES = 1000  # names blocked before the backend was ready, kept to learn later
SHADOW_CONCURRENCY = 16
log = get_logger("tiktokguard.netfilter")

Element = tuple[str, int]  # address, timeout in seconds


@dataclass(frozen=True, slots=True)
class Exemptions:
    """What the exemption sets hold: every active, unexpired allowlisted device's addresses
    (overlapping and adjacent networks merged) and MACs."""

    v4: tuple[ipaddress.IPv4Network, ...] = ()
    v6: tuple[ipaddress.IPv6Network, ...] = ()
    macs: tuple[str, ...] = ()

    @classmethod
    def of(cls, devices: Iterable[Device], now: float) -> Exemptions:
        v4: list[ipaddress.IPv4Network] = []
        v6: list[ipaddress.IPv6Network] = []
        macs: set[str] = set()
        for device in devices:
            if not device.exempt_at(now):
                continue
            for net in device.addresses:
                if isinstance(net, ipaddress.IPv4Network):
                    v4.append(net)
                else:
                    v6.append(net)
            macs.update(device.macs)
        return cls(tuple(ipaddress.collapse_addresses(v4)),
                   tuple(ipaddress.collapse_addresses(v6)), tuple(sorted(macs)))

    def __len__(self) -> int:
        return len(self.v4) + len(self.v6) + len(self.macs)


def interval(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[str, str | None]:
    """An nftables interval [start, end): the end is the first address after the network, or
    None when the network reaches the top of the address space (the interval is then open)."""
    last = net.broadcast_address
    end = None if int(last) == 2 ** net.max_prefixlen - 1 else str(last + 1)
    return str(net.network_address), end


class KernelSets(Protocol):
    """A backend: creates its sets, adds (or refreshes) timed elements, rewrites the exemptions."""

    def ensure(self) -> object:
        """Create what is missing; return a value that changes when the sets are made anew
        (None: the backend cannot tell)."""
        ...

    def add(self, v4: list[Element], v6: list[Element], refresh: set[str]) -> None: ...

    def exempt(self, exemptions: Exemptions) -> None: ...


NFPROTO_INET = 1
# Elements per netlink message: an attribute's length is 16 bits (64 KiB), ~48 bytes an element.
ELEMENTS_PER_BATCH = 1000
ELEM_INTERVAL_END = frozenset({1, "NFT_SET_ELEM_INTERVAL_END"})
# pyroute2 0.9.x encodes NFTA_SET_ELEM_FLAGS by enumerating a dict's *keys* ({1: name}), so the
# flag is found as 1; a fixed pyroute2 would look for the name. Both are in the set; the namespace
# tests check that CIDR exemptions really match.


class NftablesSets:
    """`table inet <table>` with two timed sets of learned addresses and three exemption sets
    (IPv4 and IPv6 intervals, MACs), written over netlink with pyroute2."""

    def __init__(self, config: NetfilterConfig) -> None:
        self.table = config.table
        self.names = {4: config.set_v4, 6: config.set_v6}
        self.default_timeout = config.default_timeout
        self.exempt_names = {"ipv4_addr": config.exempt_v4, "ipv6_addr": config.exempt_v6,
                             "ether_addr": config.exempt_mac}

    def _nft(self) -> Any:
        from pyroute2.nftables.main import NFTables

        return NFTables(nfgen_family=NFPROTO_INET)  # one table for IPv4 and IPv6

    @staticmethod
    def _tables(nft: Any) -> dict[str, int]:
        """name → handle of the inet tables."""
        return {t.get_attr("NFTA_TABLE_NAME"): t.get_attr("NFTA_TABLE_HANDLE")
                for t in nft.get_tables()}

    def _sets(self, nft: Any) -> dict[str, int]:
        """Our table's sets: name → handle."""
        return {s.get_attr("NFTA_SET_NAME"): s.get_attr("NFTA_SET_HANDLE")
                for s in nft.get_sets() if s.get_attr("NFTA_SET_TABLE") == self.table}

    def ensure(self) -> object:
        from pyroute2.nftables.main import NFTSet

        nft = self._nft()
        try:
            if self.table not in self._tables(nft):
                nft.table("add", name=self.table)
            sets = self._sets(nft)
            wanted: list[Any] = [
                NFTSet(table=self.table, name=name, key_type=f"ipv{version}_addr",
                       timeout=self.default_timeout * 1000)
                for version, name in self.names.items()]
            interval_set = _nft_classes()[0]
            wanted += [(interval_set if key != "ether_addr" else NFTSet)(
                table=self.table, name=name, key_type=key)
                for key, name in self.exempt_names.items()]
            for item in wanted:
                if item.name in sets:
                    continue  # made by an earlier run, or by the shipped ruleset
                with contextlib.suppress(TypeError):
                    # pyroute2 0.9.x raises TypeError *after* the kernel accepted the new set
                    # (it iterates a list as an async iterator); what the kernel holds is
                    # checked just below.
                    nft.sets("add", set=item)
            held = self._sets(nft)
            missing = {item.name for item in wanted} - set(held)
            if missing:
                raise OSError(f"nftables sets not created: {sorted(missing)}")
            # A table made anew gets a new handle (a per-namespace counter); its sets' handles
            # start again from the same numbers, so the table's is the one that tells.
            return self._tables(nft).get(self.table), tuple(sorted(held.items()))
        finally:
            nft.close()

    def add(self, v4: list[Element], v6: list[Element], refresh: set[str]) -> None:
        """Add timed elements; an element being refreshed is deleted and added again in the same
        transaction (nftables cannot change an element's timeout), so it is never missing."""
        from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM
        from pyroute2.nftables.main import NFTSetElem

        nft = self._nft()
        try:
            for version, elements in ((4, v4), (6, v6)):
                key = f"ipv{version}_addr"
                modifier = _modifier(key)
                target = [["NFTA_SET_ELEM_LIST_TABLE", self.table],
                          ["NFTA_SET_ELEM_LIST_SET", self.names[version]]]
                for i in range(0, len(elements), ELEMENTS_PER_BATCH):
                    chunk = elements[i:i + ELEMENTS_PER_BATCH]
                    again = [NFTSetElem(value=a).as_netlink(modifier)
                             for a, _t in chunk if a in refresh]
                    new = [NFTSetElem(value=a, timeout=t * 1000).as_netlink(modifier)
                           for a, t in chunk]
                    messages = [(NFT_MSG_NEWSETELEM,
                                 [*target, ["NFTA_SET_ELEM_LIST_ELEMENTS", new]])]
                    if again:
                        messages.insert(0, (NFT_MSG_DELSETELEM,
                                            [*target, ["NFTA_SET_ELEM_LIST_ELEMENTS", again]]))
                    _transaction(nft, messages)
        finally:
            nft.close()

    def exempt(self, exemptions: Exemptions) -> None:
        """Replace the exemption sets' contents in one transaction: no moment in between where
        an allowlisted device is not exempt."""
        from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM
        from pyroute2.nftables.main import NFTSetElem

        interval_end = _nft_classes()[1]
        messages: list[tuple[int, list[Any]]] = []
        for key, values in (("ipv4_addr", exemptions.v4), ("ipv6_addr", exemptions.v6),
                            ("ether_addr", exemptions.macs)):
            target = [["NFTA_SET_ELEM_LIST_TABLE", self.table],
                      ["NFTA_SET_ELEM_LIST_SET", self.exempt_names[key]]]
            messages.append((NFT_MSG_DELSETELEM, target))  # no elements: flush the set
            elements: list[Any] = []
            for value in values:
                if isinstance(value, str):  # a MAC
                    elements.append(NFTSetElem(value=value))
                    continue
                start, end = interval(value)
                elements.append(NFTSetElem(value=start))
                if end is not None:
                    elements.append(interval_end(value=end))
            modifier = _modifier(key)
            for i in range(0, len(elements), ELEMENTS_PER_BATCH):  # still one transaction
                chunk = [e.as_netlink(modifier) for e in elements[i:i + ELEMENTS_PER_BATCH]]
                messages.append((NFT_MSG_NEWSETELEM,
                                 [*target, ["NFTA_SET_ELEM_LIST_ELEMENTS", chunk]]))
        nft = self._nft()
        try:
            _transaction(nft, messages)
        finally:
            nft.close()


@functools.cache
def _nft_classes() -> tuple[type, type]:
    """Two small extensions of pyroute2's nftables classes (imported late: pyroute2 takes a
    fifth of a second to import, and only the netfilter backends need it)."""
    from pyroute2.nftables.main import NFTSet, NFTSetElem

    class IntervalSet(NFTSet):
        """pyroute2's NFTSet has no interval flag; CIDR exemptions need it."""

        def as_netlink(self) -> dict[str, Any]:
            attrs: dict[str, Any] = NFTSet.as_netlink(self)
            attrs["NFTA_SET_FLAGS"] = set(attrs["NFTA_SET_FLAGS"]) | {"NFT_SET_INTERVAL"}
            return attrs

    class IntervalEnd(NFTSetElem):
        """The element that closes an interval (NFT_SET_ELEM_INTERVAL_END)."""

        def as_netlink(self, modifier: Any) -> dict[str, Any]:
            attrs: dict[str, Any] = NFTSetElem.as_netlink(self, modifier)
            attrs["attrs"].append(["NFTA_SET_ELEM_FLAGS", ELEM_INTERVAL_END])
            return attrs

    return IntervalSet, IntervalEnd


def _modifier(key: str) -> Any:
    """pyroute2's encoder for a key type, as its own set_elems prepares it."""
    from pyroute2.netlink.nfnetlink.nftsocket import DATA_TYPE_NAME_TO_INFO

    modifier = DATA_TYPE_NAME_TO_INFO[key][2]()
    modifier.header = None
    return modifier


def _transaction(nft: Any, messages: list[tuple[int, list[Any]]]) -> None:
    """Send set-element messages as one nftables batch: the kernel applies all or none."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
    from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_NEWSETELEM, nft_set_elem_list_msg

    batch = []
    begin, end = nfgen_msg(), nfgen_msg()
    for marker, kind in ((begin, 0x10), (end, 0x11)):  # NFNL_MSG_BATCH_BEGIN / _END
        marker["res_id"] = NFNL_SUBSYS_NFTABLES
        marker["header"]["type"] = kind
        marker["header"]["flags"] = NLM_F_REQUEST
    batch.append(begin)
    for kind, attrs in messages:
        msg = nft_set_elem_list_msg()
        msg["attrs"] = attrs
        msg["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | kind
        msg["header"]["flags"] = (NLM_F_REQUEST | NLM_F_ACK
                                  | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0))
        msg["nfgen_family"] = NFPROTO_INET
        batch.append(msg)
    batch.append(end)

    async def send() -> None:
        async for _ in nft.asyncore.nlm_request_batch(batch):  # raises NetlinkError
            pass

    nft._run_with_cleanup(send)  # how pyroute2's own NFTables methods run their coroutines


class IpsetSets:
    """Two ipsets of learned addresses (hash:ip, family inet and inet6, with timeouts) and three
    exemption sets (hash:net inet and inet6, hash:mac), through pyroute2's IPSet."""

    def __init__(self, config: NetfilterConfig) -> None:
        import socket

        self.names = {4: config.set_v4, 6: config.set_v6}
        self.default_timeout = config.default_timeout
        # name → (type, family) of each exemption set; hash:mac has no address family
        self.exempt_sets = {config.exempt_v4: ("hash:net", socket.AF_INET),
                            config.exempt_v6: ("hash:net", socket.AF_INET6),
                            config.exempt_mac: ("hash:mac", socket.AF_UNSPEC)}
        self.exempt_mac = config.exempt_mac
        self.mac_supported = True

    @staticmethod
    def _create(ipset: Any, name: str, stype: str, family: int, **options: Any) -> None:
        try:
            ipset.create(name, stype=stype, family=family, exclusive=False, **options)
        except Exception as exc:  # already there with other options, no permission, no type
            try:
                exists = bool(list(ipset.list(name)))
            except Exception:
                exists = False
            if not exists:
                raise OSError(f"ipset {name} ({stype}): {exc}") from None

    def ensure(self) -> object:
        import socket

        from pyroute2 import IPSet

        with IPSet() as ipset:
            for version, name in self.names.items():
                family = socket.AF_INET if version == 4 else socket.AF_INET6
                self._create(ipset, name, "hash:ip", family, timeout=self.default_timeout)
            for name, (stype, family) in self.exempt_sets.items():
                if name != self.exempt_mac:
                    self._create(ipset, name, stype, family)
                    continue
                try:
                    self._create(ipset, name, stype, family)
                except OSError as exc:
                    # Some kernels are built without hash:mac; addresses still work.
                    if self.mac_supported:  # said once, not at every check
                        log.warning("netfilter_mac_exemptions_unavailable", error=str(exc),
                                    hint="allowlist devices by address, or use the nftables "
                                         "backend")
                    self.mac_supported = False
                else:
                    self.mac_supported = True
        return None  # ipset has no generation to compare: exemptions are rewritten each check

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

    def exempt(self, exemptions: Exemptions) -> None:
        """Fill a fresh set per exemption set and swap it in (atomic for each set)."""
        from pyroute2 import IPSet

        contents = dict(zip(self.exempt_sets, ([str(n) for n in exemptions.v4],
                                               [str(n) for n in exemptions.v6],
                                               list(exemptions.macs)), strict=True))
        with IPSet() as ipset:
            for name, (stype, family) in self.exempt_sets.items():
                if name == self.exempt_mac and not self.mac_supported:
                    continue
                fresh = f"{name[:26]}.new"  # ipset names have at most 31 characters
                with contextlib.suppress(Exception):
                    ipset.destroy(fresh)  # left over from an interrupted run
                ipset.create(fresh, stype=stype, family=family)
                try:
                    for value in contents[name]:
                        ipset.add(fresh, value, family=family,
                                  etype="mac" if stype == "hash:mac" else "net")
                    ipset.swap(fresh, name)
                finally:
                    ipset.destroy(fresh)


def make_backend(config: NetfilterConfig) -> KernelSets | None:
    if config.backend == "nftables":
        return NftablesSets(config)
    if config.backend == "ipset":
        return IpsetSets(config)
    return None


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
            log.info("netfilter_ready", backend=self.config.backend)
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
