"""What every kernel backend shares: the protocol it implements, and the exemptions it holds.

Pure: no pyroute2, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from tiktokguard.policy.clients import Device

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


__all__ = ["Element", "Exemptions", "KernelSets", "interval"]
