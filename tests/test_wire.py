"""The hand-written wire reader and answer builders, cross-checked against dnslib and dnspython."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import dnslib
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tiktokguard.dns.answers import BlockAnswers
from tiktokguard.dns.cache import CacheEntry, cache_ttl
from tiktokguard.dns.wire import (
    EDNS_OPTION_MAC,
    FORMERR,
    NOTIMP,
    DropPacket,
    QueryError,
    additional_that_fits,
    answer_addresses,
    build_query,
    chain_names,
    decode_mac_option,
    index_response,
    parse_query,
    question_addresses,
    read_name,
    strip_opt,
    text_to_wire,
    wire_to_text,
)

labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
                 min_size=1, max_size=20)
names = st.lists(labels, min_size=1, max_size=6).map(".".join)
qtypes = st.sampled_from([1, 2, 5, 6, 12, 15, 16, 28, 33, 64, 65, 255])


@given(name=names, qtype=qtypes, edns=st.booleans(), do=st.booleans(),
       payload=st.integers(512, 4096), qid=st.integers(0, 65535))
def test_parse_query_agrees_with_dnslib(name: str, qtype: int, edns: bool, do: bool,
                                        payload: int, qid: int) -> None:
    q = dns.message.make_query(name, qtype, use_edns=0 if edns else False, payload=payload,
                               want_dnssec=do and edns)
    q.id = qid
    wire = q.to_wire()
    parsed = parse_query(wire)
    reference = dnslib.DNSRecord.parse(wire)
    assert parsed.id == reference.header.id
    assert parsed.qtype == reference.q.qtype and parsed.qclass == reference.q.qclass
    assert parsed.qname == text_to_wire(str(reference.q.qname))
    assert parsed.name == str(reference.q.qname).rstrip(".").lower()
    assert parsed.question == wire[12:12 + len(parsed.question)]
    assert parsed.edns == edns
    if edns:
        assert parsed.udp_size == payload and parsed.do == do


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300))
def test_parse_query_never_crashes_on_garbage(data: bytes) -> None:
    """Arbitrary bytes: a Query, a QueryError or DropPacket, never anything else."""
    try:
        query = parse_query(data)
    except (DropPacket, QueryError):
        return
    assert query.question == data[12:12 + len(query.question)]
    assert query.qname == query.question[:-4].lower()


@given(prefix=st.binary(min_size=12, max_size=12), body=st.binary(max_size=200))
def test_parse_query_header_fuzz(prefix: bytes, body: bytes) -> None:
    data = bytearray(prefix + body)
    data[2] &= 0x7F  # make it a query
    with contextlib.suppress(DropPacket, QueryError):
        parse_query(bytes(data))


def test_query_errors() -> None:
    with pytest.raises(DropPacket):
        parse_query(b"\x00" * 11)
    response = dns.message.make_response(dns.message.make_query("a.example", "A")).to_wire()
    with pytest.raises(DropPacket):
        parse_query(response)
    q = dns.message.make_query("a.example", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    with pytest.raises(QueryError) as err:
        parse_query(q.to_wire())
    assert err.value.rcode == NOTIMP
    pointer = struct.pack("!HHHHHH", 1, 0x100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
    with pytest.raises(QueryError) as err:
        parse_query(pointer)
    assert err.value.rcode == FORMERR


def test_two_opt_records_are_formerr() -> None:
    q = dns.message.make_query("a.example", "A", use_edns=0)
    wire = bytearray(q.to_wire())
    opt = bytes(wire[-11:])
    wire += opt
    struct.pack_into("!H", wire, 10, 2)
    with pytest.raises(QueryError) as err:
        parse_query(bytes(wire))
    assert err.value.rcode == FORMERR


@pytest.mark.parametrize("encoded", [bytes.fromhex("02005e100001"), b"02:00:5e:10:00:01",
                                     b"AgBeEAAB"])
def test_mac_option_encodings(encoded: bytes) -> None:
    assert decode_mac_option(encoded) == bytes.fromhex("02005e100001")
    q = dns.message.make_query("a.example", "A", use_edns=0,
                               options=[dns.edns.GenericOption(EDNS_OPTION_MAC, encoded)])
    assert parse_query(q.to_wire()).mac == bytes.fromhex("02005e100001")


@pytest.mark.parametrize("encoded", [b"", b"\x01", b"zz:zz:zz:zz:zz:zz", b"!!!!!!!!"])
def test_bad_mac_option_is_ignored(encoded: bytes) -> None:
    assert decode_mac_option(encoded) is None


@given(name=names)
def test_wire_text_round_trip(name: str) -> None:
    assert wire_to_text(text_to_wire(name)) == name.lower()


def test_wire_to_text_escapes_odd_bytes() -> None:
    assert wire_to_text(b"\x03a.b\x03com\x00") == "a\\046b.com"
    assert wire_to_text(b"\x00") == ""


@pytest.mark.parametrize("mode", ["nxdomain", "null", "refused", "redirect"])
@given(name=names, qtype=qtypes, edns=st.booleans())
def test_block_answers_parse_with_dnspython(mode: str, name: str, qtype: int,
                                            edns: bool) -> None:
    builder = BlockAnswers(mode, 123, "192.0.2.80", "2001:db8::80")
    q = dns.message.make_query(name + ".tiktok.com", qtype, use_edns=0 if edns else False)
    wire = builder.blocked(parse_query(q.to_wire()), "tiktok.com")
    reply = dns.message.from_wire(wire)
    assert reply.id == q.id and reply.question == q.question
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RD
    assert (reply.edns >= 0) == edns
    if edns:
        assert [o.code for o in reply.options] == [dns.edns.EDECode.BLOCKED]
    if mode == "nxdomain":
        assert reply.rcode() == dns.rcode.NXDOMAIN
    if reply.authority:
        assert reply.authority[0].name == dns.name.from_text("tiktok.com")
        assert reply.authority[0].ttl == 123 and reply.authority[0][0].minimum == 123


def test_upstream_query_carries_no_client_options() -> None:
    wire = build_query(0x4242, 0x0110 | 0x8000, text_to_wire("a.example"), 1, 1, True)
    message = dns.message.from_wire(wire)
    assert message.id == 0x4242 and message.flags & dns.flags.RD and message.flags & dns.flags.CD
    assert not message.flags & dns.flags.QR
    assert message.edns == 0 and message.ednsflags & dns.flags.DO and message.options == ()


def _upstream_reply(ttl: int = 300) -> bytes:
    q = dns.message.make_query("www.example.com", "A", use_edns=0)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("www.example.com.", ttl, "IN", "CNAME", "e.example.net."))
    r.answer.append(dns.rrset.from_text("e.example.net.", ttl // 2, "IN", "A", "192.0.2.1"))
    r.authority.append(dns.rrset.from_text("example.net.", 50_000, "IN", "NS", "ns.example.net."))
    return r.to_wire()


def test_index_and_strip_opt_and_render_agree_with_dnspython() -> None:
    wire = _upstream_reply()
    index = index_response(wire)
    assert index.opt_span is not None and index.min_ttl == 150
    stripped, sindex = strip_opt(wire, index)
    assert dns.message.from_wire(stripped).edns < 0
    entry = CacheEntry(stripped, sindex.ttl_offsets, 1000.0, 1000.0 + cache_ttl(sindex),
                       sindex.question_end)
    client = dns.message.make_query("WWW.example.COM", "A", use_edns=0)
    query = parse_query(client.to_wire())
    reply = dns.message.from_wire(entry.answer(query, 1100.0, udp=True))
    assert reply.id == client.id and reply.question[0].name.to_text() == "WWW.example.COM."
    assert [rr.ttl for rr in reply.answer] == [200, 50]
    assert reply.authority[0].ttl == 50_000 - 100
    assert reply.edns == 0
    expired = entry.answer(query, 1000.0 + 10**6, udp=False)
    assert all(rr.ttl == 0 for rr in dns.message.from_wire(expired).answer)


@pytest.mark.parametrize("garbage", [b"\x00" * 12 + b"\x01", _upstream_reply()[:-3],
                                     _upstream_reply() + b"\x00"])
def test_index_rejects_malformed_responses(garbage: bytes) -> None:
    data = bytearray(garbage)
    if len(data) == 13:
        struct.pack_into("!H", data, 4, 1)
    with pytest.raises(ValueError):
        index_response(bytes(data))


def test_index_tells_when_the_answer_names_other_names() -> None:
    q = dns.message.make_query("www.example.com", "A")
    plain = dns.message.make_response(q)
    plain.answer.append(dns.rrset.from_text("www.example.com.", 60, "IN", "A", "192.0.2.1"))
    assert index_response(plain.to_wire()).other_names is False
    chained = dns.message.make_response(q)
    chained.answer.append(dns.rrset.from_text("www.example.com.", 60, "IN", "CNAME",
                                              "edge.example.net."))
    chained.answer.append(dns.rrset.from_text("edge.example.net.", 60, "IN", "A", "192.0.2.1"))
    assert index_response(chained.to_wire()).other_names is True
    # An owner written out instead of compressed to the question: looked at, to be safe.
    uncompressed = plain.to_wire()
    owner = q.question[0].name.to_wire()
    at = uncompressed.index(b"\xc0\x0c")
    uncompressed = uncompressed[:at] + owner + uncompressed[at + 2:]
    assert index_response(uncompressed).other_names is True


@given(st.lists(st.tuples(st.sampled_from(["A", "AAAA", "TXT", "MX"]), st.integers(0, 2**31 - 1),
                          st.integers(0, 2**128 - 1)), max_size=8),
       st.booleans())
@example([("AAAA", 0, 1 << 64), ("AAAA", 7, 0x10000)], False)  # dnslib: ::1:0:0:0:0, ::0.1.0.0
def test_question_addresses_agree_with_dnslib(records: list[tuple[str, int, int]],
                                              edns: bool) -> None:
    q = dns.message.make_query("www.example.com", "A", use_edns=0 if edns else None)
    r = dns.message.make_response(q)
    for rtype, ttl, value in records:
        data = {"A": str(ipaddress.IPv4Address(value % 2**32)),
                "AAAA": str(ipaddress.IPv6Address(value)), "TXT": '"x"',
                "MX": "10 mx.example.net."}[rtype]
        r.answer.append(dns.rrset.from_text("www.example.com.", ttl, "IN", rtype, data))
    r.authority.append(dns.rrset.from_text("example.com.", 60, "IN", "NS", "ns.example.net."))
    wire = r.to_wire()
    index = index_response(wire)
    assert index.other_names is False
    expected = [(ipaddress.ip_address(str(rr.rdata)), rr.ttl)
                for rr in dnslib.DNSRecord.parse(wire).rr
                if rr.rtype in (dnslib.QTYPE.A, dnslib.QTYPE.AAAA)]
    found = question_addresses(wire, index)
    assert [(ipaddress.ip_address(a), ttl) for a, ttl in found] == expected
    # ...and spelled the one way (RFC 5952), whatever dnslib writes: 0:0:0:1:: not ::1:0:0:0:0
    assert all(a == str(ipaddress.ip_address(a)) for a, _ttl in found)


# -- the one reader of upstream answers: names, chains, addresses, EDE ---------------------------

record_types = st.sampled_from(["A", "AAAA", "CNAME", "DNAME", "TXT", "MX"])


def _rdata_text(rtype: str, value: int, target: str) -> str:
    return {"A": str(ipaddress.IPv4Address(value % 2**32)),
            "AAAA": str(ipaddress.IPv6Address(value)), "CNAME": target + ".",
            "DNAME": target + ".", "TXT": '"x"', "MX": f"10 {target}."}[rtype]


@given(qname=names, records=st.lists(st.tuples(names, record_types, st.integers(0, 2**31 - 1),
                                               st.integers(0, 2**128 - 1), names),
                                     max_size=10))
def test_chain_names_and_addresses_agree_with_dnspython(
        qname: str, records: list[tuple[str, str, int, int, str]]) -> None:
    q = dns.message.make_query(qname, "A", use_edns=0)
    r = dns.message.make_response(q)
    for owner, rtype, ttl, value, target in records:
        rrset = r.find_rrset(r.answer, dns.name.from_text(owner), dns.rdataclass.IN,
                             dns.rdatatype.from_text(rtype), create=True)
        rrset.add(dns.rdata.from_text("IN", rtype, _rdata_text(rtype, value, target)), ttl)
    wire = r.to_wire()  # compressed by dnspython, as an upstream would
    index = index_response(wire)
    reference = dns.message.from_wire(wire)
    expected_names = set()
    expected_addresses = []
    for rrset in reference.answer:
        expected_names.add(rrset.name.canonicalize().to_wire())
        for rdata in rrset:
            if rrset.rdtype in (dns.rdatatype.CNAME, dns.rdatatype.DNAME):
                expected_names.add(rdata.target.canonicalize().to_wire())
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                expected_addresses.append((rrset.name.canonicalize().to_wire(),
                                           ipaddress.ip_address(rdata.address), rrset.ttl))
    found = chain_names(wire, index)
    assert set(found) == expected_names and len(found) == len(set(found))
    addresses = [(owner, ipaddress.ip_address(a), ttl)
                 for owner, a, ttl in answer_addresses(wire, index)]
    assert sorted(addresses, key=str) == sorted(expected_addresses, key=str)
    # dnslib, record by record and in wire order (it knows no DNAME, but reads past it)
    by_dnslib = [(text_to_wire(str(rr.rname)), ipaddress.ip_address(str(rr.rdata)), rr.ttl)
                 for rr in dnslib.DNSRecord.parse(wire).rr
                 if rr.rtype in (dnslib.QTYPE.A, dnslib.QTYPE.AAAA)]
    assert addresses == by_dnslib


@given(data=st.binary(max_size=120), pos=st.integers(0, 130))
def test_read_name_raises_only_value_error(data: bytes, pos: int) -> None:
    try:
        name, end = read_name(data, pos)
    except ValueError:
        return
    assert len(name) <= 255 and name.endswith(b"\x00") and pos < end <= len(data)
    assert dns.name.from_wire(data, pos)[0].canonicalize().to_wire() == name


def test_read_name_rejects_loops_and_forward_pointers() -> None:
    with pytest.raises(ValueError, match="loop"):
        read_name(b"\x00" * 12 + b"\xc0\x0c", 12)  # points at itself
    with pytest.raises(ValueError, match="loop"):
        read_name(b"\x00" * 12 + b"\xc0\x0e\x01a\x00", 12)  # points forwards
    assert read_name(b"\x01A\x00" + b"\x01b\xc0\x00", 3) == (b"\x01b\x01a\x00", 7)


@given(codes=st.lists(st.integers(0, 30), max_size=3), other=st.booleans())
def test_upstream_ede_is_read_with_its_text(codes: list[int], other: bool) -> None:
    q = dns.message.make_query("www.example.com", "A", use_edns=0)
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.SERVFAIL)
    options = [dns.edns.EDEOption(code, f"why {code}") for code in codes]
    if other:
        options.insert(0, dns.edns.GenericOption(dns.edns.OptionType.NSID, b"upstream-1"))
    r.use_edns(0, options=options)
    index = index_response(r.to_wire())
    stripped, sindex = strip_opt(r.to_wire(), index)
    entry = CacheEntry(stripped, sindex.ttl_offsets, 0.0, 5.0, sindex.question_end,
                       ede=sindex.ede)
    reply = dns.message.from_wire(entry.answer(parse_query(q.to_wire()), 1.0, udp=True))
    assert [(o.code, o.text) for o in reply.options] == [(c, f"why {c}") for c in codes]
    assert index.dnssec_failure == any(c in {1, 2, 5, 6, 7, 8, 9, 10, 11, 12} for c in codes)


@given(sizes=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), max_size=8),
       limit=st.integers(12, 400))
def test_additional_that_fits_keeps_whole_rrsets_in_order(sizes: list[tuple[int, int]],
                                                           limit: int) -> None:
    q = dns.message.make_query("mx.example.com", "MX", use_edns=False)
    r = dns.message.make_response(q)
    groups = []
    for i, (owner, count) in enumerate(sizes):
        rrset = dns.rrset.from_text(f"m{owner}-{i}.example.com.", 60, "IN", "TXT",
                                    *[f'"{i}-{j}"' for j in range(count)])
        r.additional.append(rrset)
        groups.append(count)
    wire = r.to_wire()
    index = index_response(wire)
    end, kept = additional_that_fits(wire, index.additional_at, index.arcount, limit)
    assert end <= max(limit, index.additional_at)
    cut = wire[:10] + struct.pack("!H", kept) + wire[12:end]
    kept_rrsets = dns.message.from_wire(cut).additional
    assert [len(rrset) for rrset in kept_rrsets] == groups[:len(kept_rrsets)]
    if len(kept_rrsets) < len(groups):  # it stopped because the next RRset did not fit
        r.additional = r.additional[:len(kept_rrsets) + 1]
        assert len(r.to_wire()) > limit  # (compression only looks back: same offsets)


@pytest.mark.parametrize("hexwire", [
    # found by a TCP fuzz run of mutated queries (9 of 1 505 answers did not parse with
    # dnspython): each answer must parse
    "b4262fd30001000000000001076578616d706c65036f7267000010000100662904d0000000000016fde9000602005e"
    "000001000a000831323334353637f8",  # UPDATE, zone of type TXT, with OPT
    "86124a830001000000000000037777770674696b416f6bc1636f6d000041c501",  # a pointer in the name
    "70322a7400015f7b00000000000b076578616d706c",  # UPDATE, root zone of type 0x0b07
    "5dd61bbb0001000000000000046d61736bce1e32130669636c6f756403636f6d0000ff0001",  # pointer
])
def test_every_error_answer_parses(hexwire: str) -> None:
    from tiktokguard.dns.wire import error_response

    with pytest.raises(QueryError) as err:
        parse_query(bytes.fromhex(hexwire))
    reply = dns.message.from_wire(error_response(err.value))
    assert reply.rcode() == dns.rcode.NOTIMP
    assert not reply.flags & dns.flags.RA and reply.flags & dns.flags.QR


def test_a_name_longer_than_255_is_formerr_with_the_opt() -> None:
    from tiktokguard.dns.wire import error_response

    name = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"  # 257 octets
    wire = (struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 1) + name + b"\x00\x01\x00\x01"
            + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00")
    with pytest.raises(QueryError) as err:
        parse_query(wire)
    reply = dns.message.from_wire(error_response(err.value))
    assert reply.rcode() == dns.rcode.FORMERR and reply.edns == 0 and not reply.question
