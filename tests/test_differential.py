"""tiktokguard as a forwarder, compared with the validating resolver it forwards to.

A loopback world (tests/dnsworld.py: NSD with signed, bogus and plain zones, a validating unbound
on top) and tiktokguard forwarding to that unbound. Every query variant (names by types by RD,
CD, DO, AD, EDNS on/off, buffer 512/1232/4096, 0x20 case, UDP with TCP fallback or TCP) is asked
of unbound directly and then of tiktokguard from an unmanaged client; the two answers must be
equal in rcode, flags, question, EDNS (version, DO, payload, EDE) and every section, TTLs no
higher than unbound's, except for the differences in EXPECTED, each with its reason. SPECIAL
adds what a forwarder must not pass on (zone transfers, classes CH and HS) in a few variants.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from tests.conftest import UNMANAGED, running_daemon
from tests.dnsworld import dns_world, missing_tools

pytestmark = pytest.mark.skipif(bool(missing_tools()),
                                reason=f"needs Debian's nsd, unbound, bind9-utils: "
                                       f"{', '.join(missing_tools())} missing")

# (name, type) pairs: every kind of answer the world has.
BASE = [
    ("signed.test", "SOA"), ("signed.test", "NS"), ("signed.test", "DNSKEY"),
    ("www.signed.test", "A"), ("www.signed.test", "AAAA"), ("www.signed.test", "TXT"),
    ("www.signed.test", "ANY"), ("c1.signed.test", "A"), ("c3.signed.test", "AAAA"),
    ("out.signed.test", "A"), ("x.d.signed.test", "A"), ("y.d.signed.test", "TXT"),
    ("d.signed.test", "DNAME"), ("nothing.d.signed.test", "A"), ("a.wild.signed.test", "A"),
    ("b.c.wild.signed.test", "TXT"), ("big.signed.test", "TXT"), ("mx.signed.test", "MX"),
    ("nx.signed.test", "A"), ("srv.signed.test", "SRV"), ("odd\\.dot.signed.test", "A"),
    ("sp\\032ace.signed.test", "A"), ("\\000null.signed.test", "A"),
    ("l" * 63 + ".signed.test", "A"), ("mixed.signed.test", "A"),
    ("www.bogus.test", "A"), ("txt.bogus.test", "TXT"), ("bogus.test", "SOA"),
    ("www.plain.test", "A"), ("c.plain.test", "A"), ("big.plain.test", "TXT"),
    ("nx.plain.test", "AAAA"),
]
# (name, type, class): refused by both, never forwarded (docs/design.md §5).
SPECIAL = [
    ("version.bind", "TXT", "CH"), ("hostname.bind", "TXT", "CH"), ("id.server", "TXT", "CH"),
    ("signed.test", "SOA", "HS"), ("signed.test", "AXFR", "IN"), ("signed.test", "IXFR", "IN"),
    ("www.signed.test", "A", "CH"),
]


@dataclass(frozen=True)
class Variant:
    name: str
    edns: bool = True
    payload: int = 1232
    rd: bool = True
    cd: bool = False
    do: bool = False
    ad: bool = False
    case: bool = False  # 0x20: random upper/lower case in the question name
    tcp: bool = False


VARIANTS = [
    Variant("plain"), Variant("noedns", edns=False), Variant("b512", payload=512),
    Variant("b4096", payload=4096), Variant("do", do=True), Variant("docd", do=True, cd=True),
    Variant("cd", cd=True), Variant("ad", ad=True), Variant("do512", do=True, payload=512),
    Variant("case-do", do=True, case=True), Variant("rd0", rd=False),
    Variant("tcp-do", do=True, tcp=True), Variant("case-noedns", edns=False, case=True),
    Variant("adcd4096", do=True, ad=True, cd=True, payload=4096),
]


def _random_case(name: str, rng: random.Random) -> str:
    return "".join(c.upper() if c.isalpha() and rng.random() < 0.5 else c for c in name)


def make_query(name: str, rdtype: str, v: Variant, rng: random.Random, rdclass: str = "IN"
               ) -> dns.message.Message:
    qname = _random_case(name, rng) if v.case else name
    q = dns.message.make_query(qname, rdtype, rdclass, use_edns=0 if v.edns else False,
                               payload=v.payload, want_dnssec=v.do)
    q.flags = dns.flags.RD if v.rd else 0
    if v.cd:
        q.flags |= dns.flags.CD
    if v.ad:
        q.flags |= dns.flags.AD
    return q


async def ask(q: dns.message.Message, port: int, source: str, tcp: bool
              ) -> tuple[dns.message.Message, bool]:
    """The answer, and whether the UDP answer was truncated (then retried over TCP)."""
    if tcp:
        return await dns.asyncquery.tcp(q, "127.0.0.1", port=port, source=source,
                                        timeout=5), False
    reply, used_tcp = await dns.asyncquery.udp_with_fallback(
        q, "127.0.0.1", port=port, source=source, timeout=5)
    return reply, used_tcp


def _section(rrsets: list[Any]) -> list[tuple[Any, ...]]:
    return sorted((rrset.name.to_text().lower(), rrset.rdclass, rrset.rdtype, rrset.covers,
                   tuple(sorted(r.to_digestable() for r in rrset)))
                  for rrset in rrsets)


def shape(reply: dns.message.Message, truncated: bool) -> dict[str, Any]:
    """Everything compared, but TTLs and the ID."""
    return {
        "rcode": reply.rcode(),
        "flags": dns.flags.to_text(reply.flags),
        "truncated_over_udp": truncated,
        "question": [(r.name.to_text(), r.rdclass, r.rdtype) for r in reply.question],
        "edns": reply.edns,
        "do": bool(reply.ednsflags & dns.flags.DO),
        "payload": reply.payload if reply.edns >= 0 else None,
        "ede": sorted((o.code, o.text) for o in reply.options
                      if isinstance(o, dns.edns.EDEOption)),
        "other_options": sorted(o.otype for o in reply.options
                                if not isinstance(o, dns.edns.EDEOption)),
        "answer": _section(reply.answer),
        "authority": _section(reply.authority),
        "additional": _section(reply.additional),
    }


def ttls(reply: dns.message.Message) -> dict[tuple[Any, ...], int]:
    out = {}
    for section, rrsets in (("an", reply.answer), ("au", reply.authority),
                            ("ad", reply.additional)):
        for rrset in rrsets:
            out[(section, rrset.name.to_text().lower(), rrset.rdtype, rrset.covers)] = rrset.ttl
    return out


# The deliberate differences, each with its reason. A predicate sees the query, its variant and
# both shapes; it returns True when the difference is this one.
Expected = Callable[[str, str, Variant, dict[str, Any], dict[str, Any]], bool]
EXPECTED: list[tuple[str, Expected]] = [
    ("RFC 1035 §4.1.1: RA says whether the server offers recursion, and tiktokguard does; unbound "
     "clears it when it refuses a zone transfer. Both REFUSED, nothing else differs.",
     lambda name, rdtype, v, a, b: (rdtype in ("AXFR", "IXFR")
                                    and {**a, "flags": ""} == {**b, "flags": ""}
                                    and a["flags"] + " RA" == b["flags"])),
]


@dataclass
class Tally:
    identical: int = 0
    expected: int = 0
    total: int = 0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with dns_world(tmp_path_factory.mktemp("world")) as w:
        yield w


async def test_answers_equal_to_validating_unbound(world: Any, tmp_path: Path) -> None:
    rng = random.Random(20261126)
    cases = [((name, rdtype, "IN"), v) for (name, rdtype), v in itertools.product(BASE, VARIANTS)]
    special_variants = [VARIANTS[0], VARIANTS[1], VARIANTS[4], VARIANTS[11]]
    cases += list(itertools.product(SPECIAL, special_variants))
    assert len(cases) >= 300
    tally = Tally()
    differences: list[str] = []
    async with running_daemon(tmp_path, [world.unbound],
                              extra="[dns]\nupstream_timeout_ms = 3000") as tg:
        for (name, rdtype, rdclass), v in cases:
            q = make_query(name, rdtype, v, rng, rdclass)
            direct, direct_tc = await ask(q, world.unbound_port, "127.0.0.1", v.tcp)
            via, via_tc = await ask(q, tg.port, UNMANAGED, v.tcp)
            tally.total += 1
            a, b = shape(direct, direct_tc), shape(via, via_tc)
            if a == b:
                tally.identical += 1
            elif any(match(name, rdtype, v, a, b) for _reason, match in EXPECTED):
                tally.expected += 1
                continue
            else:
                diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
                differences.append(f"{name} {rdtype} [{v.name}]: {diff}")
                continue
            direct_ttls, via_ttls = ttls(direct), ttls(via)
            for key, ttl in via_ttls.items():
                # Both count in whole seconds, from different starting instants: 1 s slack.
                if ttl > direct_ttls[key] + 1:
                    differences.append(f"{name} {rdtype} [{v.name}]: TTL {key} {ttl} > "
                                       f"{direct_ttls[key]}")
    print(f"differential: {tally.identical} identical, {tally.expected} expected differences, "
          f"{tally.total} in all")
    assert not differences, "\n".join(differences[:40]) + f"\n({len(differences)} in all)"


# ISC's EDNS compliance probes (genreport), each against tiktokguard forwarding to the world's
# unbound, for the SOA of the signed zone. RD=1 throughout: tiktokguard is a recursive service
# (RD=0 is refused by design, docs/design.md §5).
COOKIE = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, bytes(range(8)))
PROBES: dict[str, tuple[dict[str, Any], bool]] = {
    # name: (make_query arguments, over TCP)
    "dns": ({"use_edns": False}, False),
    "edns": ({"use_edns": 0}, False),
    "edns1": ({"use_edns": 1}, False),
    "ednsopt": ({"use_edns": 0, "options": [dns.edns.GenericOption(100, b"")]}, False),
    "edns1opt": ({"use_edns": 1, "options": [dns.edns.GenericOption(100, b"")]}, False),
    "do": ({"use_edns": 0, "want_dnssec": True}, False),
    "docd": ({"use_edns": 0, "want_dnssec": True, "flags": dns.flags.RD | dns.flags.CD}, False),
    "ednsflags": ({"use_edns": 0, "ednsflags": 0x80}, False),
    "optlist": ({"use_edns": 0, "options": [
        dns.edns.GenericOption(dns.edns.OptionType.NSID, b""),
        dns.edns.ECSOption("0.0.0.0", 0),
        dns.edns.GenericOption(dns.edns.OptionType.EXPIRE, b""), COOKIE]}, False),
    "signed": ({"use_edns": 0, "want_dnssec": True}, False),
    "ednstcp": ({"use_edns": 0}, True),
}


def probe_problems(name: str, q: dns.message.Message, r: dns.message.Message) -> list[str]:
    problems = []
    version = q.edns
    soa = [rrset for rrset in r.answer if rrset.rdtype == dns.rdatatype.SOA]
    if r.id != q.id or r.question != q.question:
        problems.append("id or question not echoed")
    if version > 0:
        if r.rcode() != dns.rcode.BADVERS:
            problems.append(f"rcode {dns.rcode.to_text(r.rcode())}, not BADVERS")
        if soa:
            problems.append("an answer with BADVERS")
    else:
        if r.rcode() != dns.rcode.NOERROR or not soa:
            problems.append(f"rcode {dns.rcode.to_text(r.rcode())}, answer {r.answer}")
    if version < 0:
        if r.edns >= 0:
            problems.append("OPT in the answer to a query without EDNS")
        return problems
    if r.edns != 0:
        problems.append(f"answer EDNS version {r.edns}, not 0")
    if any(o.otype in (100, dns.edns.OptionType.EXPIRE, dns.edns.OptionType.ECS)
           for o in r.options):
        problems.append(f"options echoed: {r.options}")
    want_do = bool(q.ednsflags & dns.flags.DO)
    if bool(r.ednsflags & dns.flags.DO) != want_do:
        problems.append("DO not echoed" if want_do else "DO set unasked")
    if r.ednsflags & ~dns.flags.DO & 0xFFFF:
        problems.append(f"unknown EDNS flags echoed: {r.ednsflags:#x}")
    if bool(r.flags & dns.flags.CD) != bool(q.flags & dns.flags.CD):
        problems.append("CD not echoed")
    if r.flags & 0x0040:
        problems.append("Z bit set")
    if name == "signed" and not any(rrset.rdtype == dns.rdatatype.RRSIG for rrset in r.answer):
        problems.append("no RRSIG in a DNSSEC answer")
    return problems


async def test_isc_edns_probes(world: Any, tmp_path: Path) -> None:
    failed = {}
    async with running_daemon(tmp_path, [world.unbound]) as tg:
        for name, (arguments, tcp) in PROBES.items():
            q = dns.message.make_query("signed.test", "SOA", **arguments)
            if tcp:
                r = await dns.asyncquery.tcp(q, "127.0.0.1", port=tg.port, source=UNMANAGED,
                                             timeout=5)
            else:
                r = await dns.asyncquery.udp(q, "127.0.0.1", port=tg.port, source=UNMANAGED,
                                             timeout=5)
            problems = probe_problems(name, q, r)
            if problems:
                failed[name] = problems
    assert not failed, failed
    assert len(PROBES) == 11
