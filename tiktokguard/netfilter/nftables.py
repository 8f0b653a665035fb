"""The nftables backend: `table inet <table>` with two timed sets of learned addresses and three
exemption sets, written over netlink with pyroute2's asynchronous nftables API (AsyncNFTables).

Each call runs in a worker thread (the Backstop uses asyncio.to_thread) on an event loop of its
own, so the daemon's loop never waits for the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tiktokguard.config import NetfilterConfig
from tiktokguard.netfilter.sets import Element, Exemptions, interval

T = TypeVar("T")
NFPROTO_INET = 1
# Elements per netlink message: an attribute's length is 16 bits (64 KiB), ~48 bytes an element.
ELEMENTS_PER_BATCH = 1000
ELEM_INTERVAL_END = frozenset({1, "NFT_SET_ELEM_INTERVAL_END"})
# pyroute2 0.9.x encodes NFTA_SET_ELEM_FLAGS by enumerating a dict's *keys* ({1: name}), so the
# flag is found as 1; a fixed pyroute2 would look for the name. Both are in the set; the namespace
# tests check that CIDR exemptions really match.


class NftablesSets:
    """`table inet <table>` with two timed sets of learned addresses and three exemption sets
    (IPv4 and IPv6 intervals, MACs). Each method is synchronous (called in a worker thread) and
    runs its netlink conversation on an event loop of its own."""

    def __init__(self, config: NetfilterConfig) -> None:
        self.table = config.table
        self.names = {4: config.set_v4, 6: config.set_v6}
        self.default_timeout = config.default_timeout
        self.exempt_names = {"ipv4_addr": config.exempt_v4, "ipv6_addr": config.exempt_v6,
                             "ether_addr": config.exempt_mac}

    @staticmethod
    def _run(work: Callable[[Any], Awaitable[T]]) -> T:
        """work(nft) with a fresh netlink socket, on this thread's own event loop."""
        async def session() -> T:
            from pyroute2.nftables.main import AsyncNFTables

            nft = AsyncNFTables(nfgen_family=NFPROTO_INET)  # one table for IPv4 and IPv6
            await nft.setup_endpoint()
            try:
                return await work(nft)
            finally:
                nft.close()
        return asyncio.run(session())

    @staticmethod
    async def _tables(nft: Any) -> dict[str, int]:
        """name → handle of the inet tables."""
        return {t.get_attr("NFTA_TABLE_NAME"): t.get_attr("NFTA_TABLE_HANDLE")
                async for t in await nft.get_tables()}

    async def _sets(self, nft: Any) -> dict[str, int]:
        """Our table's sets: name → handle."""
        return {s.get_attr("NFTA_SET_NAME"): s.get_attr("NFTA_SET_HANDLE")
                async for s in await nft.get_sets() if s.get_attr("NFTA_SET_TABLE") == self.table}

    def ensure(self) -> object:
        return self._run(self._ensure)

    async def _ensure(self, nft: Any) -> object:
        from pyroute2.nftables.main import NFTSet

        if self.table not in await self._tables(nft):
            await nft.table("add", name=self.table)
        sets = await self._sets(nft)
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
                # pyroute2 0.9.x raises TypeError *after* the kernel accepted the new set (its
                # sets() iterates a list as an async iterator); what the kernel holds is
                # checked just below.
                await nft.sets("add", set=item)
        held = await self._sets(nft)
        missing = {item.name for item in wanted} - set(held)
        if missing:
            raise OSError(f"nftables sets not created: {sorted(missing)}")
        # A table made anew gets a new handle (a per-namespace counter); its sets' handles start
        # again from the same numbers, so the table's is the one that tells.
        return (await self._tables(nft)).get(self.table), tuple(sorted(held.items()))

    def add(self, v4: list[Element], v6: list[Element], refresh: set[str]) -> None:
        """Add timed elements; an element being refreshed is deleted and added again in the same
        transaction (nftables cannot change an element's timeout), so it is never missing."""
        from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM
        from pyroute2.nftables.main import NFTSetElem

        transactions = []
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
                messages = [(NFT_MSG_NEWSETELEM, [*target, ["NFTA_SET_ELEM_LIST_ELEMENTS", new]])]
                if again:
                    messages.insert(0, (NFT_MSG_DELSETELEM,
                                        [*target, ["NFTA_SET_ELEM_LIST_ELEMENTS", again]]))
                transactions.append(messages)

        async def write(nft: Any) -> None:
            for messages in transactions:
                await _transaction(nft, messages)
        self._run(write)

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
        self._run(lambda nft: _transaction(nft, messages))


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


async def _transaction(nft: Any, messages: list[tuple[int, list[Any]]]) -> None:
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

    async for _ in nft.nlm_request_batch(batch):  # each message acknowledged; NetlinkError
        pass


__all__ = ["NftablesSets"]
