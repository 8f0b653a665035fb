"""DNS wire format without I/O: read a query's question and EDNS, build synthetic answers.

This is the per-query hot path, so it reads the few fields the policy needs straight from the
bytes instead of parsing whole messages. It is also the one reader of upstream answers (record
positions and TTLs for the cache; owner names, CNAME/DNAME targets and addresses for CNAME
inspection and the network backstop; the upstream's EDE), so those two can never drift apart.
Every function here is cross-checked against dnslib and dnspython in tests/test_wire.py.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

# Names and the two rcodes the policy uses live in dnsname (no dependencies); re-exported here for
# the DNS path's modules.
from tiktokguard.dnsname import NOERROR as NOERROR
from tiktokguard.dnsname import NXDOMAIN as NXDOMAIN
from tiktokguard.dnsname import text_to_wire as text_to_wire
from tiktokguard.dnsname import wire_to_text as wire_to_text

# RFC 1035 §4.1.1 header flags and codes.
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010
OPCODE_MASK = 0x7800
OPCODE_UPDATE = 5 << 11

FORMERR, SERVFAIL, NOTIMP, REFUSED = 1, 2, 4, 5
BADVERS = 16  # RFC 6891 §6.1.3: extended RCODE, upper 8 bits travel in the OPT TTL

TYPE_A, TYPE_CNAME, TYPE_SOA, TYPE_AAAA, TYPE_DNAME, TYPE_OPT = 1, 5, 6, 28, 39, 41
TYPE_RRSIG = 46
TYPE_IXFR, TYPE_AXFR = 251, 252
CLASS_IN = 1

EDNS_OPTION_MAC = 65001  # dnsmasq --add-mac: the client's MAC, added by an access router
EDNS_OPTION_EDE = 15  # RFC 8914 Extended DNS Error
EDE_BLOCKED = 15
EDE_FILTERED = 17
EDE_NETWORK_ERROR = 23  # RFC 8914 §4.24: no upstream could be reached
# RFC 8914 §5.2: the EDE codes that report a DNSSEC validation failure (not "Stale Answer" 3,
# "Forged Answer" 4, or any of the operational ones from 13 on).
EDE_DNSSEC = frozenset({1, 2, 5, 6, 7, 8, 9, 10, 11, 12})

# Our advertised UDP payload size: the DNS Flag Day 2020 value, which avoids IP fragmentation.
OUR_UDP_SIZE = 1232

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class DropPacket(Exception):
    """The packet cannot be answered at all (shorter than a header, or not a query)."""


class QueryError(Exception):
    """The packet is a query we answer with an error RCODE (FORMERR, NOTIMP, BADVERS)."""

    def __init__(self, rcode: int, reason: str, query: Query | None = None,
                 qid: int = 0, flags: int = 0) -> None:
        super().__init__(reason)
        self.rcode = rcode
        self.reason = reason
        self.query = query
        self.qid = qid
        self.flags = flags


@dataclass(slots=True)
class Query:
    """What the resolver needs to know about one query, read from its wire form."""

    id: int
    flags: int
    qname: bytes  # wire form, lower-cased: b"\x03www\x06tiktok\x03com\x00"
    question: bytes  # the question section as sent (name in the client's case, type, class)
    qtype: int
    qclass: int
    edns: bool = False
    udp_size: int = 512
    do: bool = False
    edns_version: int = 0
    mac: bytes | None = None  # EDNS0 option 65001, 6 bytes, when present and well formed

    @property
    def name(self) -> str:
        """The query name as text (for logs, events and the CLI; never on the hot path)."""
        return wire_to_text(self.qname)

    def max_udp_response(self) -> int:
        """Largest UDP response this client accepts (RFC 1035 512, RFC 6891 advertised size)."""
        if not self.edns:
            return 512
        return max(512, min(self.udp_size, OUR_UDP_SIZE))


def _read_name_end(data: bytes, pos: int) -> int:
    """Offset just past a (possibly compressed) name at pos; raises IndexError/ValueError."""
    end = len(data)
    while True:
        if pos >= end:
            raise IndexError("name runs past the end")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > end:
                raise IndexError("pointer runs past the end")
            return pos + 2
        if length & 0xC0:
            raise ValueError("reserved label type")
        pos += 1 + length


def parse_query(data: bytes) -> Query:
    """Read header, question and OPT of a query.

    Raises DropPacket for what must not be answered and QueryError for what is answered with an
    error code; the error carries as much of the query as could be read (RFC 6891 §7: an error
    answer to an EDNS query has an OPT too, and it echoes the question when there is one). The
    question name must be uncompressed (a pointer there has nothing to point at).
    """
    end = len(data)
    if end < 12:
        raise DropPacket("shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & 0xF800:  # QR or an opcode
        if flags & QR:
            raise DropPacket("a response, not a query")
        raise QueryError(NOTIMP, "opcode other than QUERY", _salvage(data), qid, flags)
    if qdcount != 1:
        raise QueryError(FORMERR, f"QDCOUNT is {qdcount}", _salvage(data), qid, flags)
    try:
        pos = _question_root(data)
    except ValueError:
        raise QueryError(FORMERR, "bad label in question", qid=qid, flags=flags) from None
    except IndexError:
        raise QueryError(FORMERR, "question name runs past the end", qid=qid,
                         flags=flags) from None
    if pos > QUESTION_ROOT_MAX:
        # No name to echo, but the query's OPT is still answered with ours (RFC 6891 §7).
        raise QueryError(FORMERR, "question name longer than 255", _salvage(data), qid, flags)
    question_end = pos + 5
    if question_end > end:
        raise QueryError(FORMERR, "question truncated", qid=qid, flags=flags)
    query = Query(qid, flags, data[12:pos + 1].lower(), data[12:question_end],
                  (data[pos + 1] << 8) | data[pos + 2], (data[pos + 3] << 8) | data[pos + 4])
    if arcount:
        _read_opt(data, question_end, ancount + nscount, arcount, query)
    return query


# Where the root label of a question name of 255 octets ends it (RFC 1035 §3.1).
QUESTION_ROOT_MAX = 12 + 254


def _question_root(data: bytes) -> int:
    """Offset of the root label that ends the question name at 12, walking its labels. A
    length over 63 is a compression pointer or a reserved label type: neither belongs in a
    question name (a pointer there has nothing to point at, and in an answer that echoes it,
    something else). ValueError for those, IndexError when the name runs past the end."""
    pos = 12
    length = data[12]
    while length:
        if length > 63:
            raise ValueError("bad label in question")
        pos += length + 1
        length = data[pos]
    return pos


def _salvage(data: bytes) -> Query | None:
    """The question and EDNS of a query that is answered with an error anyway (an opcode we do
    not serve, a QDCOUNT other than 1), read as far as they can be; None when even that fails.
    A query with no question gets an empty `question`."""
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    try:
        pos = 12
        if qdcount == 1:
            pos = _question_root(data) + 5  # (echoed as it is: read as parse_query reads it)
        else:
            for _ in range(qdcount):
                pos = _read_name_end(data, pos) + 4
        if pos > len(data):
            return None
        end = pos - 4
        qtype = (data[end] << 8) | data[end + 1] if qdcount == 1 else 0
        if qdcount != 1 or end - 1 > QUESTION_ROOT_MAX or (
                (flags & OPCODE_MASK) == OPCODE_UPDATE and qtype != TYPE_SOA):
            # No question to echo: none or several, a name over 255 octets, or an UPDATE,
            # whose first section is its zone, of type SOA (RFC 2136 §2.3): parsers refuse an
            # answer that echoes a zone of another type.
            query = Query(qid, flags, b"", b"", 0, 0)
        else:
            query = Query(qid, flags, data[12:end].lower(), data[12:pos], qtype,
                          (data[end + 2] << 8) | data[end + 3])
        if arcount:
            _read_opt(data, pos, ancount + nscount, arcount, query)
    except (IndexError, ValueError, QueryError):
        return None
    return query


def _read_opt(data: bytes, pos: int, skip: int, arcount: int, query: Query) -> None:
    """Find the OPT record among the additional records and fill the EDNS fields of query."""
    end = len(data)
    seen_opt = False
    try:
        for index in range(skip + arcount):
            name_start = pos
            pos = _read_name_end(data, pos)
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
            pos += 10
            rdata_end = pos + rdlength
            if rdata_end > end:
                raise IndexError("rdata runs past the end")
            if rtype == TYPE_OPT and index >= skip:
                if seen_opt or data[name_start] != 0:
                    # RFC 6891 §6.1.1: more than one OPT, or an OPT not owned by the root.
                    raise QueryError(FORMERR, "bad OPT record", query=query,
                                     qid=query.id, flags=query.flags)
                seen_opt = True
                query.edns = True
                query.udp_size = rclass
                query.edns_version = (ttl >> 16) & 0xFF
                query.do = bool(ttl & 0x8000)
                query.mac = _read_mac_option(data, pos, rdata_end)
            pos = rdata_end
    except (IndexError, ValueError, struct.error) as exc:
        raise QueryError(FORMERR, f"malformed record section: {exc}", query=query,
                         qid=query.id, flags=query.flags) from None
    if query.edns and query.edns_version > 0:
        raise QueryError(BADVERS, f"EDNS version {query.edns_version}", query=query,
                         qid=query.id, flags=query.flags)


def _read_mac_option(data: bytes, pos: int, end: int) -> bytes | None:
    """The MAC in option 65001, in any of dnsmasq's encodings (binary, text, base64)."""
    mac = None
    while pos + 4 <= end:
        code, length = struct.unpack_from("!HH", data, pos)
        pos += 4
        if pos + length > end:
            raise IndexError("EDNS option runs past the end")
        if code == EDNS_OPTION_MAC:
            mac = decode_mac_option(data[pos:pos + length])
        pos += length
    return mac


def decode_mac_option(value: bytes) -> bytes | None:
    """dnsmasq add-mac sends 6 raw bytes; add-mac=text sends aa:bb:..; add-mac=base64 8 chars."""
    if len(value) == 6:
        return bytes(value)
    if len(value) == 17:
        try:
            return bytes.fromhex(value.decode("ascii").replace(":", "").replace("-", ""))
        except (UnicodeDecodeError, ValueError):
            return None
    if len(value) == 8:
        import base64
        import binascii

        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        return raw if len(raw) == 6 else None
    return None


# ----------------------------------------------------------------------------------------------
# Building answers


def _flags_for_answer(query_flags: int, rcode: int) -> int:
    """Response flags: QR, the query's opcode and RD and CD, RA since we recurse, and rcode.
    Never AA: every synthetic answer speaks for a policy, not for the zone. Not RA on NOTIMP:
    for an opcode we do not implement, whether we recurse says nothing (unbound's answer, and
    what ISC's EDNS compliance tests expect)."""
    return (QR | (RA if rcode != NOTIMP else 0) | (query_flags & (OPCODE_MASK | RD | CD))
            | (rcode & 0xF))


def ede_option(info_code: int, text: str) -> bytes:
    """An Extended DNS Error option (RFC 8914) in wire form."""
    payload = _U16.pack(info_code) + text.encode("utf-8")
    return _U16.pack(EDNS_OPTION_EDE) + _U16.pack(len(payload)) + payload


def opt_record(do: bool = False, ext_rcode: int = 0, ede: tuple[int, str] | None = None,
               options: bytes = b"") -> bytes:
    """Our OPT pseudo-record (RFC 6891), optionally carrying an Extended DNS Error (RFC 8914)
    of our own, or `options` already in wire form (an upstream's EDE, passed on)."""
    rdata = options if ede is None else options + ede_option(*ede)
    ttl = ((ext_rcode >> 4) << 24) | (0x8000 if do else 0)
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, OUR_UDP_SIZE, ttl, len(rdata)) + rdata


def error_response(err: QueryError) -> bytes:
    """The answer to a query we refuse to process (FORMERR, NOTIMP, BADVERS)."""
    query = err.query
    if query is None:
        return _HEADER.pack(err.qid, _flags_for_answer(err.flags, err.rcode), 0, 0, 0, 0)
    return response(query, err.rcode)


def response(query: Query, rcode: int, answers: bytes = b"", ancount: int = 0,
             authority: bytes = b"", nscount: int = 0, ede: tuple[int, str] | None = None
             ) -> bytes:
    """A complete response: the question echoed, the given sections, and OPT when the query had
    EDNS (RFC 6891 §7: a responder that understands EDNS answers an EDNS query with OPT)."""
    opt = b""
    if query.edns:
        opt = opt_record(query.do, rcode, ede)
    header = _HEADER.pack(query.id, _flags_for_answer(query.flags, rcode),
                          1 if query.question else 0, ancount, nscount, 1 if opt else 0)
    return header + query.question + answers + authority + opt


def truncated_response(query: Query) -> bytes:
    """An empty answer with TC set: "ask again over TCP" (RFC 7766 §5; the RRL slip)."""
    wire = response(query, NOERROR)
    return wire[:2] + bytes([wire[2] | (TC >> 8)]) + wire[3:]


def bare_response(query: Query, rcode: int) -> bytes:
    """Header and question only, without OPT (the form answers take in the cache)."""
    flags = _flags_for_answer(query.flags, rcode)
    return _HEADER.pack(query.id, flags, 1, 0, 0, 0) + query.question


def soa_record(owner: bytes, ttl: int) -> bytes:
    """A synthetic SOA (RFC 2308 §3): its TTL and MINIMUM bound how long clients cache the
    negative answer. owner is a wire name or a 2-byte compression pointer."""
    rdata = (_SOA_MNAME + _SOA_RNAME
             + struct.pack("!IIIII", 1, 3600, 600, 86400, ttl))
    return owner + _RR_FIXED.pack(TYPE_SOA, CLASS_IN, ttl, len(rdata)) + rdata


_SOA_MNAME = text_to_wire("tiktokguard.invalid")
_SOA_RNAME = text_to_wire("hostmaster.tiktokguard.invalid")


def suffix_pointer(query: Query, suffix: bytes) -> bytes:
    """A compression pointer to suffix inside the echoed question name, or suffix itself."""
    offset = len(query.qname) - len(suffix)
    if offset >= 0 and query.qname.endswith(suffix) and 12 + offset < 0x3FFF:
        return _U16.pack(0xC000 | (12 + offset))
    return suffix


def address_record(qtype: int, ttl: int, address: bytes) -> bytes:
    """An A or AAAA answer owned by the question name (pointer to offset 12)."""
    return b"\xc0\x0c" + _RR_FIXED.pack(qtype, CLASS_IN, ttl, len(address)) + address


def negative_answer(query: Query, rcode: int, zone: bytes, ttl: int,
                    ede: tuple[int, str] | None = None) -> bytes:
    """NXDOMAIN or NODATA with a synthetic SOA for zone in the authority section."""
    return response(query, rcode, authority=soa_record(suffix_pointer(query, zone), ttl),
                    nscount=1, ede=ede)


def truncate_for_udp(query: Query, wire: bytes) -> bytes:
    """RFC 1035 §4.2.1 / RFC 7766: an answer too large for the client's UDP size becomes an
    empty one with TC set, so the client retries over TCP."""
    if len(wire) <= query.max_udp_response():
        return wire
    qid, flags = struct.unpack_from("!HH", wire)
    rcode = flags & 0xF
    opt = opt_record(query.do, rcode) if query.edns else b""
    return (_HEADER.pack(qid, flags | TC, 1, 0, 0, 1 if opt else 0) + query.question + opt)


def additional_that_fits(wire: bytes, pos: int, count: int, limit: int) -> tuple[int, int]:
    """RFC 2181 §9 for the additional section: the end offset and number of its first `count`
    records (starting at pos) that fit within limit bytes, whole RRsets only (a run of records
    with the same owner, type and, for RRSIG, type covered), in order, stopping at the first
    RRset that does not fit (as unbound packs it)."""
    kept_end, kept = pos, 0
    group: tuple[bytes, int, bytes] | None = None
    group_size = 0
    for _ in range(count):
        owner, at = read_name(wire, pos)
        rtype, _rclass, _ttl, rdlength = _RR_FIXED.unpack_from(wire, at)
        covered = wire[at + 10:at + 12] if rtype == TYPE_RRSIG else b""
        key = (owner, rtype, covered)
        if key != group:
            if group is not None:
                if pos > limit:
                    return kept_end, kept
                kept_end, kept = pos, kept + group_size
            group, group_size = key, 0
        group_size += 1
        pos = at + 10 + rdlength
    if group is not None and pos <= limit:
        kept_end, kept = pos, kept + group_size
    return kept_end, kept


# ----------------------------------------------------------------------------------------------
# Reading upstream responses (miss path only)


@dataclass(slots=True)
class RecordIndex:
    """Where the records of a response sit, so a cache hit can patch TTLs without parsing."""

    rcode: int
    flags: int
    ancount: int
    nscount: int
    arcount: int
    question_end: int
    ttl_offsets: tuple[int, ...]  # TTL fields of every record except OPT
    opt_span: tuple[int, int] | None  # [start, end) of the OPT record, if any
    min_ttl: int | None  # smallest TTL over answer and authority records
    negative_ttl: int | None  # RFC 2308 §5: min(SOA TTL, SOA MINIMUM) of an authority SOA
    # Does the answer section name anything besides the question name (a CNAME/DNAME, or an
    # owner that is not a pointer to the question)? If not, CNAME inspection has nothing to see.
    other_names: bool = True
    additional_at: int = 0  # offset of the first additional record (the end, when none)
    ede: bytes = b""  # the upstream OPT's Extended DNS Error options, in wire form
    dnssec_failure: bool = False  # one of those EDEs reports a DNSSEC validation failure
    # The TTL field of each authority SOA (and of an RRSIG over it), and the SOA's MINIMUM
    # field unless such an RRSIG is there (rewriting signed data would make it bogus).
    negative_fields: tuple[int, ...] = ()


def index_response(wire: bytes) -> RecordIndex:
    """Walk a response's records; raises ValueError when it is malformed."""
    try:
        _qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
        pos = 12
        for _ in range(qdcount):
            pos = _read_name_end(wire, pos) + 4
        question_end = pos
        ttl_offsets: list[int] = []
        other_names = False
        opt_span = None
        min_ttl: int | None = None
        negative_ttl: int | None = None
        soa_ttls: list[int] = []
        soa_minimums: list[int] = []
        soa_signed = False
        additional_at = 0
        ede = b""
        before_additional = ancount + nscount
        for index in range(before_additional + arcount):
            start = pos
            if index == before_additional:
                additional_at = start
            pos = _read_name_end(wire, pos)
            rtype, _rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, pos)
            rdata = pos + 10
            end = rdata + rdlength
            if end > len(wire):
                raise ValueError("record runs past the end")
            if index < ancount and (rtype in (TYPE_CNAME, TYPE_DNAME)
                                    or wire[start:start + 2] != b"\xc0\x0c"):
                other_names = True
            if rtype == TYPE_OPT:
                if opt_span is not None:
                    raise ValueError("two OPT records")
                if index < before_additional:  # RFC 6891 §6.1.1
                    raise ValueError("OPT record outside the additional section")
                opt_span = (start, end)
                ede = _ede_options(wire, rdata, end)
            else:
                ttl_offsets.append(pos + 4)
                if index < before_additional:
                    min_ttl = ttl if min_ttl is None else min(min_ttl, ttl)
                if rtype == TYPE_SOA and ancount <= index < before_additional:
                    p = _read_name_end(wire, rdata)
                    p = _read_name_end(wire, p)
                    if p + 20 != end:
                        raise ValueError("SOA record of the wrong length")
                    minimum = _U32.unpack_from(wire, p + 16)[0]
                    negative_ttl = min(ttl, minimum)
                    soa_ttls.append(pos + 4)
                    soa_minimums.append(p + 16)
                elif (rtype == TYPE_RRSIG and ancount <= index < before_additional
                      and wire[rdata:rdata + 2] == b"\x00\x06"):
                    soa_signed = True
                    soa_ttls.append(pos + 4)  # (an RRSIG's TTL is its RRset's)
            pos = end
        if pos != len(wire):
            raise ValueError("trailing bytes after the last record")
        if not arcount:
            additional_at = pos
    except (IndexError, struct.error) as exc:
        raise ValueError(f"malformed response: {exc}") from None
    dnssec_failure = False
    at = 0
    while at + 6 <= len(ede):
        if _U16.unpack_from(ede, at + 4)[0] in EDE_DNSSEC:
            dnssec_failure = True
        at += 4 + _U16.unpack_from(ede, at + 2)[0]
    return RecordIndex(flags & 0xF, flags, ancount, nscount, arcount, question_end,
                       tuple(ttl_offsets), opt_span, min_ttl, negative_ttl, other_names,
                       additional_at, ede, dnssec_failure,
                       tuple(soa_ttls + ([] if soa_signed else soa_minimums)))


def _ede_options(wire: bytes, pos: int, end: int) -> bytes:
    """The EDE options (RFC 8914) among an OPT record's options, as they are on the wire.
    Every other option is the upstream's business with us, not the client's."""
    out = b""
    while pos + 4 <= end:
        code, length = _U16.unpack_from(wire, pos)[0], _U16.unpack_from(wire, pos + 2)[0]
        if pos + 4 + length > end:
            raise ValueError("EDNS option runs past the end")
        if code == EDNS_OPTION_EDE and length >= 2:
            out += wire[pos:pos + 4 + length]
        pos += 4 + length
    return out


MAX_POINTERS = 64  # more compression pointers than a 255-octet name can need: a loop


def read_name(wire: bytes, pos: int) -> tuple[bytes, int]:
    """The (possibly compressed) name at pos as a lower-cased, uncompressed wire name, and the
    offset just past it. Raises ValueError for a pointer loop, a forward pointer, a reserved
    label type or a name over 255 octets (RFC 1035 §3.1, §4.1.4)."""
    out = bytearray()
    end_of_name = -1
    jumps = 0
    size = len(wire)
    while True:
        if pos >= size:
            raise ValueError("name runs past the end")
        length = wire[pos]
        if length == 0:
            out.append(0)
            if len(out) > 255:
                raise ValueError("name longer than 255 octets")
            return bytes(out).lower(), (pos + 1 if end_of_name < 0 else end_of_name)
        if length & 0xC0 == 0xC0:
            if pos + 2 > size:
                raise ValueError("pointer runs past the end")
            target = ((length & 0x3F) << 8) | wire[pos + 1]
            if target >= pos or jumps >= MAX_POINTERS:
                raise ValueError("compression pointer loop")
            if end_of_name < 0:
                end_of_name = pos + 2
            jumps += 1
            pos = target
            continue
        if length & 0xC0:
            raise ValueError("reserved label type")
        if pos + 1 + length > size:
            raise ValueError("label runs past the end")
        out += wire[pos:pos + 1 + length]
        if len(out) > 255:
            raise ValueError("name longer than 255 octets")
        pos += 1 + length


def chain_names(wire: bytes, index: RecordIndex) -> list[bytes]:
    """Every name the answer section leads to (lower-cased wire form): the owner of each
    record and the target of each CNAME and DNAME. What CNAME inspection (docs/design.md §2) checks
    against the lists. Raises ValueError for a name that cannot be read."""
    names: list[bytes] = []
    pos = index.question_end
    for _ in range(index.ancount):
        owner, pos = read_name(wire, pos)
        rtype, _rclass, _ttl, rdlength = _RR_FIXED.unpack_from(wire, pos)
        rdata = pos + 10
        if owner not in names:
            names.append(owner)
        if rtype in (TYPE_CNAME, TYPE_DNAME):
            target, _end = read_name(wire, rdata)
            if target not in names:
                names.append(target)
        pos = rdata + rdlength
    return names


def _address_text(rtype: int, rdata: bytes) -> str:
    if rtype == TYPE_A:
        return socket.inet_ntop(socket.AF_INET, rdata)
    # (ipaddress, not inet_ntop: RFC 5952 text, e.g. "::1:0" and never "::0.1.0.0",
    # the one spelling the backstop keys its addresses by)
    return str(ipaddress.IPv6Address(rdata))


def answer_addresses(wire: bytes, index: RecordIndex) -> list[tuple[bytes, str, int]]:
    """(owner, address, TTL) of the A/AAAA records in the answer section, owner in
    lower-cased wire form. Raises ValueError for a name that cannot be read."""
    out: list[tuple[bytes, str, int]] = []
    pos = index.question_end
    for _ in range(index.ancount):
        owner, pos = read_name(wire, pos)
        rtype, _rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, pos)
        rdata = pos + 10
        if (rtype == TYPE_A and rdlength == 4) or (rtype == TYPE_AAAA and rdlength == 16):
            out.append((owner, _address_text(rtype, wire[rdata:rdata + rdlength]), ttl))
        pos = rdata + rdlength
    return out


def question_addresses(wire: bytes, index: RecordIndex) -> list[tuple[str, int]]:
    """(address, TTL) of the A/AAAA records in the answer section of a response that
    index_response accepted and found naming nothing but the question (`other_names` False),
    so every answer record belongs to the question name. The network backstop's fast path: no
    name decoding."""
    out: list[tuple[str, int]] = []
    pos = index.question_end
    for _ in range(index.ancount):
        pos = _read_name_end(wire, pos)
        rtype, _rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, pos)
        rdata = pos + 10
        if (rtype == TYPE_A and rdlength == 4) or (rtype == TYPE_AAAA and rdlength == 16):
            out.append((_address_text(rtype, wire[rdata:rdata + rdlength]), ttl))
        pos = rdata + rdlength
    return out


def strip_opt(wire: bytes, index: RecordIndex) -> tuple[bytes, RecordIndex]:
    """The response without its OPT record (the upstream's EDNS is not the client's; its EDE
    options stay in the index, to be passed on in our own OPT)."""
    if index.opt_span is None:
        return wire, index
    start, end = index.opt_span
    cut = end - start
    out = bytearray(wire[:start] + wire[end:])
    _U16.pack_into(out, 10, index.arcount - 1)
    offsets = tuple(o - cut if o > start else o for o in index.ttl_offsets)
    additional_at = index.additional_at - cut if index.additional_at > start else \
        index.additional_at
    stripped = RecordIndex(index.rcode, index.flags, index.ancount, index.nscount,
                           index.arcount - 1, index.question_end, offsets, None,
                           index.min_ttl, index.negative_ttl, index.other_names,
                           additional_at, index.ede, index.dnssec_failure,
                           tuple(o - cut if o > start else o for o in index.negative_fields))
    return bytes(out), stripped


def build_query(qid: int, flags: int, qname: bytes, qtype: int, qclass: int, do: bool) -> bytes:
    """An upstream query of our own: fresh ID, the client's RD and CD, our OPT and nothing else
    of the client's EDNS (so the MAC option 65001, personal data, never leaves us). AD is always
    set (RFC 6840 §5.7): the validating upstream then says whether the data is authentic,
    and the cache can give AD to the clients that ask for it (DO or AD) and to no others."""
    flags = (flags & (RD | CD)) | AD
    return (_HEADER.pack(qid, flags, 1, 0, 0, 1) + qname + struct.pack("!HH", qtype, qclass)
            + opt_record(do))
