"""The fast path against the full dnslib path: same answers for the same queries (hypothesis).

Block answers come from prepared bytes and cached answers from patched wire bytes; here every
such answer is parsed by dnslib and compared with the message dnslib builds for the same query.
"""

from __future__ import annotations

from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from tiktokguard.dns.answers import BlockAnswers
from tiktokguard.dns.cache import CacheEntry, cache_ttl
from tiktokguard.dns.wire import index_response, parse_query, strip_opt

labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                 min_size=1, max_size=12)
prefixes = st.lists(labels, min_size=0, max_size=4)
qtypes = st.sampled_from(["A", "AAAA", "TXT", "MX", "HTTPS", "ANY", "CNAME", "NS"])
rules = st.sampled_from(["tiktok.com", "tiktokcdn.com", "douyin.com", "byteoversea.com"])


def client_query(name: str, qtype: str, edns: bool, do: bool, rd: bool, cd: bool,
                 qid: int) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    q.header.rd = int(rd)
    q.header.cd = int(cd)
    if edns:
        q.add_ar(EDNS0(udp_len=1232, flags="do" if do else ""))
    return q


@settings(max_examples=300)
@given(prefix=prefixes, rule=rules, qtype=qtypes, edns=st.booleans(), do=st.booleans(),
       rd=st.booleans(), cd=st.booleans(), qid=st.integers(0, 65535),
       mode=st.sampled_from(["nxdomain", "null", "refused", "redirect"]), ttl=st.integers(0, 86400))
def test_prepared_block_answers_equal_dnslib_reference(prefix: list[str], rule: str, qtype: str,
                                                       edns: bool, do: bool, rd: bool,
                                                       cd: bool, qid: int, mode: str,
                                                       ttl: int) -> None:
    name = ".".join([*prefix, rule.upper() if qid % 2 else rule])
    q = client_query(name, qtype, edns, do and edns, rd, cd, qid)
    query = parse_query(q.pack())
    builder = BlockAnswers(mode, ttl, "192.0.2.80", "2001:db8::80")
    prepared = builder.blocked(query, rule)
    again = builder.blocked(query, rule)  # from the template this time
    assert prepared == again == builder.build_blocked(query, rule)

    ours = DNSRecord.parse(prepared)
    # The reference, built by dnslib from the query.
    ref = q.reply()
    ref.header.ra = 1
    ref.header.aa = 0
    ref.header.cd = int(cd)
    soa = RR(rule + ".", QTYPE.SOA, ttl=ttl,
             rdata=SOA("tiktokguard.invalid.", "hostmaster.tiktokguard.invalid.",
                       (1, 3600, 600, 86400, ttl)))
    if mode == "nxdomain":
        ref.header.rcode = RCODE.NXDOMAIN
        ref.add_auth(soa)
    elif mode == "refused":
        ref.header.rcode = RCODE.REFUSED
    elif qtype == "A":
        ref.add_answer(RR(name, QTYPE.A, ttl=ttl,
                          rdata=A("0.0.0.0" if mode == "null" else "192.0.2.80")))
    elif qtype == "AAAA":
        ref.add_answer(RR(name, QTYPE.AAAA, ttl=ttl,
                          rdata=AAAA("::" if mode == "null" else "2001:db8::80")))
    else:
        ref.add_auth(soa)
    assert ours.header.id == ref.header.id
    assert (ours.header.qr, ours.header.aa, ours.header.tc, ours.header.rd, ours.header.ra,
            ours.header.cd, ours.header.rcode) == (ref.header.qr, ref.header.aa, ref.header.tc,
                                                   ref.header.rd, ref.header.ra, ref.header.cd,
                                                   ref.header.rcode)
    assert ours.questions == ref.questions  # the question echoed, in the client's case
    assert [str(r) for r in ours.rr] == [str(r) for r in ref.rr]
    # The SOA owner points into the echoed question, so it has the client's case: equal as
    # DNS names (case-insensitive, RFC 4343).
    assert [str(r).lower() for r in ours.auth] == [str(r).lower() for r in ref.auth]
    opts = [r for r in ours.ar if r.rtype == QTYPE.OPT]
    assert len(opts) == (1 if edns else 0)
    if edns:
        (opt,) = opts
        assert opt.edns_do == (1 if do else 0)
        (ede,) = opt.rdata
        assert ede.code == 15 and ede.data[:2] == b"\x00\x0f" and rule.encode() in ede.data


record = st.one_of(
    st.tuples(st.just("A"), st.ip_addresses(v=4).map(str)),
    st.tuples(st.just("AAAA"), st.ip_addresses(v=6).map(str)),
    st.tuples(st.just("TXT"), st.text(alphabet="abcxyz0123 ", max_size=40)),
    st.tuples(st.just("CNAME"), labels.map(lambda s: s.lower() + ".example.net.")),
)


@settings(max_examples=300)
@given(prefix=st.lists(labels, min_size=1, max_size=3), records=st.lists(record, max_size=6),
       ttls=st.lists(st.integers(0, 100_000), min_size=6, max_size=6),
       nxdomain=st.booleans(), edns=st.booleans(), do=st.booleans(), qid=st.integers(0, 65535),
       age=st.integers(0, 200_000), upper=st.booleans())
def test_cached_answers_equal_dnslib_reference(prefix: list[str], records: list[tuple[str, str]],
                                               ttls: list[int], nxdomain: bool, edns: bool,
                                               do: bool, qid: int, age: int,
                                               upper: bool) -> None:
    name = ".".join(prefix).lower() + ".example.org"
    # What an upstream answers to our query (lower case, our OPT echoed).
    upstream_q = DNSRecord.question(name, "A")
    upstream_q.add_ar(EDNS0(udp_len=1232))
    reply = upstream_q.reply()
    if nxdomain or not records:
        reply.header.rcode = RCODE.NXDOMAIN if nxdomain else RCODE.NOERROR
        reply.add_auth(RR("example.org.", QTYPE.SOA, ttl=ttls[0],
                          rdata=SOA("ns.example.org.", "h.example.org.",
                                    (1, 2, 3, 4, ttls[1]))))
    else:
        for (rtype, value), ttl in zip(records, ttls, strict=False):
            rdata = {"A": A, "AAAA": AAAA, "TXT": TXT, "CNAME": CNAME}[rtype](value)
            reply.add_answer(RR(name, getattr(QTYPE, rtype), ttl=ttl, rdata=rdata))
    reply.add_ar(EDNS0(udp_len=4096))
    wire, index = strip_opt(*_indexed(reply.pack()))
    stored_at = 1_000_000.0
    entry = CacheEntry(wire, index.ttl_offsets, stored_at, stored_at + cache_ttl(index),
                       index.question_end)

    client_name = name.upper() if upper else name
    q = client_query(client_name, "A", edns, do and edns, True, False, qid)
    ours = DNSRecord.parse(entry.answer(parse_query(q.pack()), stored_at + age, udp=False))

    assert ours.header.id == qid and ours.header.rcode == reply.header.rcode
    assert str(ours.q.qname) == client_name + "."
    # Names compressed against the question take the client's case: compare them as DNS names
    # do, case-insensitively (the TXT data here is lower-case, so that is compared exactly).
    expected = [(str(r.rname).lower(), r.rtype, max(0, r.ttl - age), str(r.rdata).lower())
                for r in reply.rr + reply.auth]
    got = [(str(r.rname).lower(), r.rtype, r.ttl, str(r.rdata).lower())
           for r in ours.rr + ours.auth]
    assert got == expected
    opts = [r for r in ours.ar if r.rtype == QTYPE.OPT]
    assert len(opts) == (1 if edns else 0)
    if edns:
        assert opts[0].edns_do == (1 if do else 0) and opts[0].rclass == 1232


def _indexed(wire: bytes) -> tuple[bytes, object]:
    return wire, index_response(wire)
