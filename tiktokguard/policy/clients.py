"""Who is asking: the client ACL, managed networks and allowlisted social media devices.

docs/design.md §1: a client outside `dns.allow_clients` is refused; an active, unexpired allowlisted
social media device is exempt; a client in `policy.managed_networks` is subject to the policy;
everyone else we serve (BYOD, guest Wi-Fi) is outside the policy and resolved unfiltered.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ClientClass(enum.Enum):
    REFUSED = "refused"  # not one of ours: no open resolver
    ALLOWLISTED = "allowlisted"  # a social media device
    MANAGED = "managed"  # a university-managed device: the policy applies
    UNMANAGED = "unmanaged"  # served but outside the policy (BYOD, guests)


class NetworkSet:
    """Membership test for a set of CIDRs: one dict probe per distinct prefix length."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._by_len: dict[tuple[int, int], set[int]] = {}
        for net in self.networks:
            self._by_len.setdefault((net.version, net.prefixlen), set()).add(
                int(net.network_address))
        self._lens = sorted(self._by_len, key=lambda k: -k[1])

    def __contains__(self, address: IPAddress) -> bool:
        value = int(address)
        bits = 32 if address.version == 4 else 128
        for version, prefixlen in self._lens:
            if version != address.version:
                continue
            masked = (value >> (bits - prefixlen)) << (bits - prefixlen) if prefixlen else 0
            if masked in self._by_len[(version, prefixlen)]:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self.networks)


def client_address(ip: str) -> str:
    """The one spelling of a client's address that every consumer (classifier, device index,
    incidents, rate limits) keys by: without an IPv6 scope id (`fe80::20%eth0` is the device
    registered as `fe80::20`) and an IPv4-mapped IPv6 address as IPv4."""
    if "%" in ip:
        ip = ip.split("%", 1)[0]
    if ip[:7].lower() == "::ffff:" and "." in ip:
        ip = ip[7:]
    return ip


def normalise_mac(text: str) -> str:
    """aa:bb:cc:dd:ee:ff from the common notations (colons, dashes, dots, bare hex, any case)."""
    digits = "".join(ch for ch in text.strip().lower() if ch not in ":-.")
    if len(digits) != 12 or any(ch not in "0123456789abcdef" for ch in digits):
        raise ValueError(f"invalid MAC address {text!r}")
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def mac_to_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True, slots=True)
class Device:
    """An allowlisted social media device, as the policy engine needs it."""

    id: str
    name: str
    addresses: tuple[IPNetwork, ...] = ()
    macs: tuple[str, ...] = ()  # normalised aa:bb:cc:dd:ee:ff
    active: bool = True
    expires_at: float | None = None  # POSIX seconds; None never expires

    def exempt_at(self, now: float) -> bool:
        return self.active and (self.expires_at is None or now < self.expires_at)


class DeviceIndex:
    """Allowlisted devices by IP, CIDR and MAC. Rebuilt as a whole on each change, so a look-up
    always sees one consistent state; expiry is checked at look-up time (`now`)."""

    def __init__(self, devices: Iterable[Device] = ()) -> None:
        self.devices: dict[str, Device] = {d.id: d for d in devices}
        self._by_ip: dict[IPAddress, Device] = {}
        self._by_net: list[tuple[IPNetwork, Device]] = []
        self._by_mac: dict[str, Device] = {}
        self._memo: dict[str, Device | None] = {}
        self.has_macs = False
        self._rebuild()

    def _rebuild(self) -> None:
        by_ip: dict[IPAddress, Device] = {}
        by_net: list[tuple[IPNetwork, Device]] = []
        by_mac: dict[str, Device] = {}
        for device in self.devices.values():
            if not device.active:
                continue
            for net in device.addresses:
                if net.num_addresses == 1:
                    by_ip[net.network_address] = device
                else:
                    by_net.append((net, device))
            for mac in device.macs:
                by_mac[mac] = device
        by_net.sort(key=lambda item: -item[0].prefixlen)  # most specific CIDR wins
        self._by_ip, self._by_net, self._by_mac = by_ip, by_net, by_mac
        # Is any active device listed by MAC? If not, nobody needs to learn client MACs.
        self.has_macs = bool(by_mac)
        self._memo = {}

    def put(self, device: Device) -> None:
        """Add or replace a device; the next look-up sees it."""
        self.devices[device.id] = device
        self._rebuild()

    def replace_all(self, devices: Iterable[Device]) -> None:
        self.devices = {d.id: d for d in devices}
        self._rebuild()

    def __len__(self) -> int:
        return sum(1 for d in self.devices.values() if d.active)



    def active_count(self, now: float) -> int:
        return sum(1 for d in self.devices.values() if d.exempt_at(now))

    def by_address(self, ip: str) -> Device | None:
        """The active device that owns this address (exact IP before CIDR), ignoring expiry."""
        memo = self._memo
        if ip in memo:
            return memo[ip]
        device: Device | None = None
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            address = None
        if address is not None:
            device = self._by_ip.get(address)
            if device is None:
                for net, candidate in self._by_net:
                    if address.version == net.version and address in net:
                        device = candidate
                        break
        if len(memo) > 65536:
            memo.clear()
        memo[ip] = device
        return device

    def by_mac(self, mac: str) -> Device | None:
        return self._by_mac.get(mac)

    def lookup(self, ip: str, mac: str | None, now: float) -> Device | None:
        """The exempt device for this client at time now: by MAC first (it names the device
        itself, whatever address it has), then by address."""
        if mac is not None and self._by_mac:
            device = self._by_mac.get(mac)
            if device is not None and device.exempt_at(now):
                return device
        device = self.by_address(ip)
        if device is not None and device.exempt_at(now):
            return device
        return None


class ClientClassifier:
    """Maps a client to its class. Network membership is fixed by config and memoised per IP;
    device exemptions are looked up live, so a device change is seen by the next query."""

    def __init__(self, allow_clients: Iterable[IPNetwork], managed: Iterable[IPNetwork],
                 trusted_relays: Iterable[IPNetwork], devices: DeviceIndex) -> None:
        self.allow = NetworkSet(allow_clients)
        self.managed = NetworkSet(managed)
        self.relays = NetworkSet(trusted_relays)
        self.devices = devices
        self._memo: dict[str, tuple[bool, bool, bool]] = {}

    def _networks(self, ip: str) -> tuple[bool, bool, bool]:
        memo = self._memo.get(ip)
        if memo is None:
            try:
                address = ipaddress.ip_address(client_address(ip))
            except ValueError:
                memo = (False, False, False)
            else:
                memo = (address in self.allow, address in self.managed, address in self.relays)
            if len(self._memo) > 65536:
                self._memo.clear()
            self._memo[ip] = memo
        return memo

    def allows(self, ip: str) -> bool:
        """Is ip inside dns.allow_clients? (The stream listeners ask at accept.)"""
        return self._networks(ip)[0]

    def trusts_mac_from(self, ip: str) -> bool:
        return self._networks(ip)[2]

    def classify(self, ip: str, mac: str | None, now: float) -> tuple[ClientClass, Device | None]:
        allowed, managed, _relay = self._networks(ip)
        if not allowed:
            return ClientClass.REFUSED, None
        device = self.devices.lookup(ip, mac, now) if self.devices.devices else None
        if device is not None:
            return ClientClass.ALLOWLISTED, device
        if managed:
            return ClientClass.MANAGED, None
        return ClientClass.UNMANAGED, None
