"""Network-level backstop: the addresses of blocked names go into kernel sets that a firewall rule
consults, so a managed device that bypasses DNS (its own DoH, hard-coded resolvers, cached
addresses) still cannot reach TikTok.

Addresses are learned from answers that tiktokguard forwards for listed names (to unmanaged
clients and allowlisted devices) and by shadow resolution: when a managed client is blocked, the
daemon resolves the name upstream itself, in the background. Only A/AAAA records whose owner name
the list blocks are used: a CDN address reached through a CNAME is shared with unrelated services
and is never added (docs/operations.md, "The firewall backstop").

A second group of sets, the exemptions, holds the allowlisted social media devices (their
addresses and CIDRs, and their MACs), rewritten as a whole in one kernel transaction whenever a
device changes, so a firewall rule can let them through (systemd/tiktokguard-nftables.conf).

The package: `sets` (the backend protocol and the exemptions, pure), `backstop` (what to learn
and when to write it), and one module per kernel backend (`nftables`, `ipset`), the only ones
that import pyroute2, and only when that backend is in use.
"""

from __future__ import annotations

from tiktokguard.config import NetfilterConfig
from tiktokguard.netfilter.backstop import Backstop
from tiktokguard.netfilter.sets import Element, Exemptions, KernelSets, interval


def make_backend(config: NetfilterConfig) -> KernelSets | None:
    if config.backend == "nftables":
        from tiktokguard.netfilter.nftables import NftablesSets

        return NftablesSets(config)
    if config.backend == "ipset":
        from tiktokguard.netfilter.ipset import IpsetSets

        return IpsetSets(config)
    return None


__all__ = ["Backstop", "Element", "Exemptions", "KernelSets", "interval", "make_backend"]
