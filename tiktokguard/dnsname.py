"""DNS names in wire form, and the response codes a policy answers with: what the policy and the
DNS path share. No dependencies, so that `policy` need not import `dns` (no package cycle:
dns -> policy -> dnsname, dns -> metrics -> policy).
"""

from __future__ import annotations

NOERROR, NXDOMAIN = 0, 3  # RFC 1035 §4.1.1 (the other codes live in dns/wire.py)


def wire_to_text(name: bytes) -> str:
    """Presentation form of an uncompressed wire name, without the trailing dot ("" is the root)."""
    labels = []
    pos = 0
    while pos < len(name) and name[pos]:
        length = name[pos]
        label = name[pos + 1:pos + 1 + length]
        labels.append("".join(
            chr(b) if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C) else f"\\{b:03d}"
            for b in label))
        pos += 1 + length
    return ".".join(labels)


def text_to_wire(name: str) -> bytes:
    """Wire form of a dotted name (lower-cased). Raises ValueError for an invalid name."""
    name = name.strip().rstrip(".").lower()
    if not name:
        return b"\x00"
    out = bytearray()
    for label in name.split("."):
        raw = label.encode("idna") if not label.isascii() else label.encode("ascii")
        if not raw or len(raw) > 63:
            raise ValueError(f"bad label {label!r} in {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"name longer than 255 octets: {name!r}")
    return bytes(out)
