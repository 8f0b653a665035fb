"""Block answers (docs/design.md §2, `policy.block_mode`); finishing touches of forwarded answers.

No I/O. Block answers are built from the query's own bytes plus a few fixed pieces; nothing is
parsed or packed by a general-purpose library on this path.
"""

from __future__ import annotations

import ipaddress
import struct

from tiktokguard.dns.wire import (
    EDE_BLOCKED,
    EDE_FILTERED,
    NOERROR,
    NXDOMAIN,
    REFUSED,
    TYPE_A,
    TYPE_AAAA,
    Query,
    address_record,
    negative_answer,
    response,
    text_to_wire,
)

_U16 = struct.Struct("!H")
TYPE_SVCB = 64
DDR_NAME = text_to_wire("_dns.resolver.arpa")
DDR_TTL = 300


class DdrAnswer:
    """Discovery of Designated Resolvers (RFC 9462): `_dns.resolver.arpa` SVCB names this
    resolver's own encrypted endpoints, so clients upgrade to them (and to no one else's).
    The records are built once, with dnslib; an answer copies them after the question."""

    def __init__(self, name: str, dot_ports: tuple[int, ...], doh_ports: tuple[int, ...]
                 ) -> None:
        from dnslib import HTTPS, Buffer

        target = name.rstrip(".") + "."
        params = ([["alpn=dot", f"port={port}"] for port in dot_ports]
                  + [["alpn=http/1.1", f"port={port}", "key7=/dns-query{?dns}"]
                     for port in doh_ports])
        records = []
        for priority, extra in enumerate(params, start=1):
            buffer = Buffer()
            HTTPS.fromZone([str(priority), target, *extra]).pack(buffer)
            rdata = bytes(buffer.data)
            records.append(b"\xc0\x0c" + struct.pack("!HHIH", TYPE_SVCB, 1, DDR_TTL, len(rdata))
                           + rdata)
        self.records = b"".join(records)
        self.count = len(records)

    def answer(self, query: Query) -> bytes:
        """SVCB: the endpoints; any other type: NODATA (the name exists, with no such data)."""
        if query.qtype == TYPE_SVCB:
            return response(query, NOERROR, self.records, self.count)
        return negative_answer(query, NOERROR, DDR_NAME, DDR_TTL)


class BlockAnswers:
    """Builds the answer a managed client gets for a blocked name."""

    def __init__(self, mode: str = "nxdomain", ttl: int = 300, redirect_ipv4: str | None = None,
                 redirect_ipv6: str | None = None) -> None:
        self.mode = mode
        self.ttl = ttl
        self.redirect_a = ipaddress.IPv4Address(redirect_ipv4).packed if redirect_ipv4 else None
        self.redirect_aaaa = (ipaddress.IPv6Address(redirect_ipv6).packed if redirect_ipv6
                              else None)
        self._zone: dict[str, bytes] = {}
        self._ede: dict[str, tuple[int, str]] = {}
        self._templates: dict[tuple[str, int, bool, bool, int, int], tuple[bytes, bytes]] = {}

    def _zone_of(self, rule: str) -> bytes:
        zone = self._zone.get(rule)
        if zone is None:
            zone = self._zone[rule] = text_to_wire(rule)
        return zone

    def _ede_of(self, rule: str) -> tuple[int, str]:
        ede = self._ede.get(rule)
        if ede is None:
            ede = self._ede[rule] = (EDE_BLOCKED,
                                     f"TikTok/ByteDance blocked by university policy ({rule})")
        return ede

    def blocked(self, query: Query, rule: str) -> bytes:
        """The block answer, from prepared bytes: a block answer differs between queries of
        the same shape only in its ID and its question (copied from the query)."""
        qtype = query.qtype
        key = (rule, qtype if qtype in (TYPE_A, TYPE_AAAA) else 0, query.edns, query.do,
               len(query.qname), query.flags & 0x0110)  # RD and CD are echoed
        template = self._templates.get(key)
        if template is None:
            full = self.build_blocked(query, rule)
            cut = 12 + len(query.question)
            if len(self._templates) > 50_000:
                self._templates.clear()
            template = self._templates[key] = (full[2:12], full[cut:])
        head, tail = template
        return _U16.pack(query.id) + head + query.question + tail

    def build_blocked(self, query: Query, rule: str) -> bytes:
        """The block answer built from its parts (the reference for the prepared bytes)."""
        mode = self.mode
        ede = self._ede_of(rule)
        if mode == "nxdomain":
            return negative_answer(query, NXDOMAIN, self._zone_of(rule), self.ttl, ede)
        if mode == "refused":
            return response(query, REFUSED, ede=ede)
        if mode == "null":
            a: bytes | None = b"\x00" * 4
            aaaa: bytes | None = b"\x00" * 16
        else:  # redirect
            a, aaaa = self.redirect_a, self.redirect_aaaa
        if query.qtype == TYPE_A and a is not None:
            return response(query, NOERROR, address_record(TYPE_A, self.ttl, a), 1, ede=ede)
        if query.qtype == TYPE_AAAA and aaaa is not None:
            return response(query, NOERROR, address_record(TYPE_AAAA, self.ttl, aaaa), 1, ede=ede)
        return negative_answer(query, NOERROR, self._zone_of(rule), self.ttl, ede)

    def countermeasure(self, query: Query, rcode: int, label: str) -> bytes:
        """NXDOMAIN or NODATA for a bypass name, owned by the name itself."""
        return negative_answer(query, rcode, query.qname, self.ttl,
                               (EDE_FILTERED, f"bypass countermeasure: {label}"))
