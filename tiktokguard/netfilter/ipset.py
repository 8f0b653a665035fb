"""The ipset backend: two hash:ip sets of learned addresses (with timeouts) and three exemption
sets (hash:net inet and inet6, hash:mac), through pyroute2's IPSet."""

from __future__ import annotations

import contextlib
from typing import Any

from tiktokguard.config import NetfilterConfig
from tiktokguard.logs import get_logger
from tiktokguard.netfilter.sets import Element, Exemptions

log = get_logger("tiktokguard.netfilter")


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


__all__ = ["IpsetSets"]
