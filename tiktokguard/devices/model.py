"""Social media devices as IT manages them: the record, its JSON form and input validation.

No I/O. The policy (docs/policy.md; its "First phase") asks that each social media device comes
from a service request (ticket) naming its account custodian and their supervisor, and is kept in
a designated storage location; those are the fields here. Validation errors name the field.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from tiktokguard import rfc3339
from tiktokguard.policy.clients import Device, IPNetwork, normalise_mac

TEXT_FIELDS = ("name", "custodian", "supervisor", "ticket", "location")
REQUIRED_TEXT = ("name", "custodian", "supervisor", "ticket")
MAX_TEXT = 200
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs"})
MAX_ITEMS = 64
EDITABLE = (*TEXT_FIELDS, "addresses", "macs", "expires_at", "active")


class ValidationError(Exception):
    """Bad input; the API answers 400 with {"error": message, "field": field}."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def now_utc() -> datetime:
    return datetime.now(UTC)


def format_time(value: datetime | None) -> str | None:
    """RFC 3339 in UTC, to the millisecond (tiktokguard.rfc3339); None stays None."""
    return None if value is None else rfc3339.format_time(value)


def parse_time(value: Any, field: str) -> datetime | None:
    """A time from an API body or query (null allowed); ValidationError names the field."""
    if value is None:
        return None
    try:
        return rfc3339.parse(value)
    except ValueError as exc:
        message = str(exc)
        raise ValidationError(field, message + (", or null" if message.startswith("expected")
                                                 else "")) from None


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    id: str
    name: str
    addresses: tuple[str, ...]  # normalised: "10.1.2.3", "10.9.0.0/29", "2001:db8::1"
    macs: tuple[str, ...]  # aa:bb:cc:dd:ee:ff
    custodian: str
    supervisor: str
    ticket: str
    location: str
    expires_at: datetime | None
    active: bool
    created_at: datetime
    updated_at: datetime

    def networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(a) for a in self.addresses)

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def to_device(self) -> Device:
        """The form the policy engine's DeviceIndex needs."""
        return Device(self.id, self.name, self.networks(), self.macs, self.active,
                      self.expires_at.timestamp() if self.expires_at else None)

    def to_json(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or now_utc()
        return {
            "id": self.id,
            "name": self.name,
            "addresses": list(self.addresses),
            "macs": list(self.macs),
            "custodian": self.custodian,
            "supervisor": self.supervisor,
            "ticket": self.ticket,
            "location": self.location,
            "expires_at": format_time(self.expires_at),
            "active": self.active,
            "expired": self.expired(now),
            "created_at": format_time(self.created_at),
            "updated_at": format_time(self.updated_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceRecord:
        """The inverse of to_json (the local snapshot of a shared store). ValueError, KeyError."""
        def when(value: Any) -> datetime | None:
            return None if value is None else rfc3339.parse(value)
        created, updated = when(data["created_at"]), when(data["updated_at"])
        if created is None or updated is None:
            raise ValueError("created_at and updated_at are required")
        return cls(id=str(data["id"]), name=str(data["name"]),
                   addresses=tuple(data["addresses"]), macs=tuple(data["macs"]),
                   custodian=str(data["custodian"]), supervisor=str(data["supervisor"]),
                   ticket=str(data["ticket"]), location=str(data["location"]),
                   expires_at=when(data["expires_at"]), active=bool(data["active"]),
                   created_at=created, updated_at=updated)


def _text(body: dict[str, Any], field: str, required: bool) -> str:
    value = body.get(field, "")
    if not isinstance(value, str):
        raise ValidationError(field, "expected a string")
    value = value.strip()
    if required and not value:
        raise ValidationError(field, "must not be empty")
    if len(value) > MAX_TEXT:
        raise ValidationError(field, f"longer than {MAX_TEXT} characters")
    if any(unicodedata.category(ch) in _UNPRINTABLE for ch in value):
        # Control characters (C0, DEL, C1), invisible format characters (bidi overrides such
        # as U+202E, which make a name read differently in a terminal or a ticket) and lone
        # surrogates (which no UTF-8 output can carry).
        raise ValidationError(field, "control, format and surrogate characters are not allowed")
    return value


def _addresses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValidationError("addresses", "expected a list of IP addresses or CIDRs")
    if len(value) > MAX_ITEMS:
        raise ValidationError("addresses", f"more than {MAX_ITEMS} entries")
    out: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ValidationError("addresses", f"[{index}]: expected a string")
        try:
            net = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            raise ValidationError("addresses", f"[{index}]: {exc}") from None
        text = str(net.network_address) if net.num_addresses == 1 else str(net)
        if net.prefixlen < (16 if net.version == 4 else 48):
            raise ValidationError("addresses", f"[{index}]: {text} is wider than a /16 (IPv4) "
                                               "or /48 (IPv6): not one device's range")
        if text not in out:
            out.append(text)
    return tuple(out)


def _macs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValidationError("macs", "expected a list of MAC addresses")
    if len(value) > MAX_ITEMS:
        raise ValidationError("macs", f"more than {MAX_ITEMS} entries")
    out: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ValidationError("macs", f"[{index}]: expected a string")
        try:
            mac = normalise_mac(item)
        except ValueError as exc:
            raise ValidationError("macs", f"[{index}]: {exc}") from None
        if mac == "00:00:00:00:00:00":
            raise ValidationError("macs", f"[{index}]: {mac} is no device's address")
        if int(mac[:2], 16) & 1:
            # The group bit: a multicast (or broadcast) address never sends a query.
            raise ValidationError("macs", f"[{index}]: {mac} is a multicast address, not a "
                                          "device's")
        if mac not in out:
            out.append(mac)
    return tuple(out)


def _check_body(body: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValidationError(None, "expected a JSON object")
    for key in body:
        if key not in allowed:
            raise ValidationError(key, f"unknown or read-only field {key!r}")
    return body


def new_device(body: Any, device_id: str, now: datetime) -> DeviceRecord:
    """A device from a POST body. Raises ValidationError."""
    body = _check_body(body, EDITABLE)
    texts = {f: _text(body, f, f in REQUIRED_TEXT) for f in TEXT_FIELDS}
    addresses = _addresses(body.get("addresses", []))
    macs = _macs(body.get("macs", []))
    if not addresses and not macs:
        raise ValidationError("addresses", "at least one address or MAC is needed")
    active = body.get("active", True)
    if not isinstance(active, bool):
        raise ValidationError("active", "expected true or false")
    expires_at = parse_time(body.get("expires_at"), "expires_at")
    if expires_at is not None and expires_at <= now:
        raise ValidationError("expires_at", f"{body['expires_at']} has passed: a new device "
                                            "would never be exempt")
    return DeviceRecord(device_id, texts["name"], addresses, macs, texts["custodian"],
                        texts["supervisor"], texts["ticket"], texts["location"], expires_at,
                        active, now, now)


def apply_patch(record: DeviceRecord, body: Any, now: datetime) -> DeviceRecord:
    """The record with a PATCH body applied. Raises ValidationError."""
    body = _check_body(body, EDITABLE)
    if not body:
        raise ValidationError(None, "nothing to change")
    changes: dict[str, Any] = {}
    for field in TEXT_FIELDS:
        if field in body:
            changes[field] = _text(body, field, field in REQUIRED_TEXT)
    if "addresses" in body:
        changes["addresses"] = _addresses(body["addresses"])
    if "macs" in body:
        changes["macs"] = _macs(body["macs"])
    if "expires_at" in body:
        changes["expires_at"] = parse_time(body["expires_at"], "expires_at")
    if "active" in body:
        if not isinstance(body["active"], bool):
            raise ValidationError("active", "expected true or false")
        changes["active"] = body["active"]
    updated = replace(record, **changes, updated_at=now)
    if not updated.addresses and not updated.macs:
        raise ValidationError("addresses", "at least one address or MAC is needed")
    return updated


def conflicts(candidate: DeviceRecord, others: list[DeviceRecord]) -> tuple[str, str] | None:
    """(field, message) when an address or MAC of candidate is on another active device."""
    if not candidate.active:
        return None
    mine = candidate.networks()
    for other in others:
        if other.id == candidate.id or not other.active:
            continue
        for mac in candidate.macs:
            if mac in other.macs:
                return "macs", f"MAC {mac} is already on active device {other.id} ({other.name})"
        for net in mine:
            for theirs in other.networks():
                if net.version == theirs.version and net.overlaps(theirs):
                    return "addresses", (f"{net} overlaps {theirs} of active device "
                                         f"{other.id} ({other.name})")
    return None
