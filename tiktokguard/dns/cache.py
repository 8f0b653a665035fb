"""Answer cache: bounded LRU of upstream answers in wire form, no I/O, time passed in.

Entries keep the response bytes (without the upstream's OPT) and the offsets of their TTL fields,
so a hit is served by patching the ID, the flags, the question's case and the TTLs: no parse, no
pack. Keyed on (lower-cased wire name, type, class, DO bit, CD bit): an answer fetched with
checking disabled may be bogus, and RFC 4035 §3.2.2 forbids giving it to a client that asked
for validated data. Negative answers are cached for min(SOA TTL, SOA MINIMUM) as RFC 2308 §5
says; failures only briefly (RFC 9520 §3.2).

Serve-stale (RFC 8767), when on: an expired answer stays (within the LRU's bounds) for
STALE_MAX_AGE past its expiry, and when every upstream fails it is served with TTLs of
STALE_TTL and EDE 3 "Stale Answer". Served once, it is cached again as such for STALE_TTL: the
failure recheck timer of RFC 8767 §5, so a dead upstream is not asked for it again meanwhile.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

from tiktokguard.dns.wire import (
    AD,
    CD,
    NOERROR,
    NXDOMAIN,
    RD,
    SERVFAIL,
    Query,
    RecordIndex,
    additional_that_fits,
    ede_option,
    opt_record,
    truncate_for_udp,
)

MAX_TTL = 86_400  # never keep an answer longer than a day, whatever the upstream says
MAX_NEGATIVE_TTL = 3_600  # a negative answer an hour at most (unbound's cache-max-negative-ttl)
MAX_BYTES = 128 * 1024 * 1024
NEGATIVE_TTL_WITHOUT_SOA = 30  # a negative answer without SOA: RFC 2308 §5 says "SHOULD NOT" cache
SERVFAIL_TTL = 5  # RFC 9520: cache resolution failures at least 1 s, and not for long
STALE_TTL = 30  # RFC 8767 §4: the TTL of a stale answer (and how long it is served as such)
STALE_MAX_AGE = 86_400  # RFC 8767 §5 suggests 1 to 3 days past expiry at most
EDE_STALE_ANSWER = 3

CacheKey = tuple[bytes, int, int, bool, int]
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_ECHOED = RD | CD | AD  # the flags an answer takes from the query, not from the upstream


def cache_key(query: Query) -> CacheKey:
    """(name, type, class, DO, CD bit): the pipeline spells the same tuple inline on its hot
    path."""
    return (query.qname, query.qtype, query.qclass, query.do, query.flags & CD)


@dataclass(slots=True)
class CacheEntry:
    wire: bytes  # response without OPT; ID, flags and question case are patched per client
    ttl_offsets: tuple[int, ...]
    stored_at: float
    expires_at: float
    question_end: int
    chain_rule: str | None = None  # CNAME inspection: a blocked name this answer leads to
    additional_at: int = 0  # offset of the additional section in wire (0: there is none)
    ede: bytes = b""  # the upstream's Extended DNS Error options, passed on to every client
    servfail: bool = False  # a failure (RFC 9520), counted as decision="error" when served
    stale: bool = False  # served stale (RFC 8767): counted when served
    stale_until: float = 0.0  # a stale entry: no longer served after this (0: not stale yet)
    _age: int = -1
    _body: bytes = b""  # the records after the question, TTLs counted down by _age seconds
    # Header bytes 2..12 (flags and counts) and the OPT for the last query shape served (its
    # RD/CD/AD, DO and EDNS): one slot, not a table, since most entries meet one shape only
    # (a dict per entry cost ~30 MB over 160 000 cached answers, bench/run.py's peak RSS).
    # (Slots, not a tuple, and no stored size: each object per entry is ~50 bytes a 100 000.)
    _shape: int = -1
    _flags_counts: bytes = b""
    _opt: bytes = b""

    def answer(self, query: Query, now: float, udp: bool) -> bytes:
        """This answer for one client: its ID, its question bytes (its case), flags from its
        query (RFC 6840 §5.7-5.8: RD and CD echoed; AD only if the upstream set it and the
        client asked with DO or AD), TTLs counted down, our OPT when it asked with EDNS,
        fitted to its UDP size."""
        age = int(now - self.stored_at)
        if age != self._age:  # at most once a second per entry: no parse, one pass of patches
            body = bytearray(self.wire[self.question_end:])
            if age > 0:
                for offset in self.ttl_offsets:
                    at = offset - self.question_end
                    ttl = _U32.unpack_from(body, at)[0]
                    _U32.pack_into(body, at, ttl - age if ttl > age else 0)
            self._body = bytes(body)
            self._age = age
        shape = (query.flags & _ECHOED) | (query.do << 1) | query.edns
        if shape != self._shape:
            self._make_head(query, shape)
        out = (_U16.pack(query.id) + self._flags_counts + query.question + self._body
               + self._opt)
        if udp and len(out) > query.max_udp_response():
            return self._fit(query, out)
        return out

    def _make_head(self, query: Query, shape: int) -> None:
        flags = _U16.unpack_from(self.wire, 2)[0]
        ad = flags & AD if query.do or query.flags & AD else 0
        flags = (flags & ~_ECHOED) | (query.flags & (RD | CD)) | ad
        arcount = _U16.unpack_from(self.wire, 10)[0]
        opt = opt_record(query.do, options=self.ede) if query.edns else b""
        self._flags_counts = (_U16.pack(flags) + self.wire[4:10]
                              + _U16.pack(arcount + (1 if opt else 0)))
        self._opt = opt
        self._shape = shape

    def _fit(self, query: Query, out: bytes) -> bytes:
        """RFC 2181 §9: an answer too large for UDP loses additional records first, whole
        RRsets from the end (the client can do without them, so no TC); only when the answer
        and authority sections alone do not fit is it truncated (TC, retry over TCP)."""
        limit = query.max_udp_response()
        opt = self._opt
        if self.additional_at:
            start = 12 + len(query.question) + self.additional_at - self.question_end
            if start + len(opt) <= limit:
                count = _U16.unpack_from(self.wire, 10)[0]
                try:
                    end, kept = additional_that_fits(out, start, count, limit - len(opt))
                except ValueError:  # an owner name it cannot follow: no guessing, TC
                    return truncate_for_udp(query, out)
                return (out[:10] + _U16.pack(kept + (1 if opt else 0)) + out[12:end] + opt)
        return truncate_for_udp(query, out)


def _negative(index: RecordIndex) -> bool:
    """NXDOMAIN, or NODATA (NOERROR with an empty answer section): RFC 2308's two kinds."""
    return index.rcode == NXDOMAIN or (index.rcode == NOERROR and index.ancount == 0)


def cache_ttl(index: RecordIndex, max_ttl: int = MAX_TTL,
              max_negative_ttl: int = MAX_NEGATIVE_TTL) -> int:
    """How long an upstream answer may be cached, in whole seconds (0: do not cache)."""
    if index.rcode == SERVFAIL:
        return SERVFAIL_TTL
    if _negative(index):
        ttl = index.negative_ttl if index.negative_ttl is not None else NEGATIVE_TTL_WITHOUT_SOA
        return min(ttl, max_negative_ttl, max_ttl)
    if index.rcode != NOERROR:
        return 0  # REFUSED, NOTIMP, ...: the next upstream or the next try may do better
    if index.min_ttl is None:
        return 0
    return min(index.min_ttl, max_ttl)


def cap_ttls(wire: bytes, ttl_offsets: tuple[int, ...], max_ttl: int) -> bytes:
    """The answer with every TTL above max_ttl lowered to it: what we cache for a day at most,
    clients must not keep longer either (an upstream may say 2**31 - 1)."""
    out: bytearray | None = None
    for offset in ttl_offsets:
        if _U32.unpack_from(wire, offset)[0] > max_ttl:
            if out is None:
                out = bytearray(wire)
            _U32.pack_into(out, offset, max_ttl)
    return wire if out is None else bytes(out)


def cap_negative(wire: bytes, index: RecordIndex, max_negative_ttl: int) -> bytes:
    """A negative answer (NXDOMAIN, NODATA) with its authority SOA's TTL, and its MINIMUM
    unless the SOA is signed, lowered to max_negative_ttl: the negative TTL a client derives,
    min(TTL, MINIMUM) by RFC 2308 §5, is then capped either way. Other answers as they are."""
    if not index.negative_fields or not _negative(index):
        return wire
    return cap_ttls(wire, index.negative_fields, max_negative_ttl)


def set_ttls(wire: bytes, ttl_offsets: tuple[int, ...], ttl: int) -> bytes:
    out = bytearray(wire)
    for offset in ttl_offsets:
        _U32.pack_into(out, offset, ttl)
    return bytes(out)


def entry_bytes(entry: CacheEntry) -> int:
    """What an entry costs in memory, roughly: its answer, the TTL-patched copy served from,
    and the object with its offsets (measured with tracemalloc: ~2 x answer + 400)."""
    return 2 * len(entry.wire) + 8 * len(entry.ttl_offsets) + 400


class AnswerCache:
    """LRU over CacheEntry, bounded in entries and in bytes; `get` returns only live entries
    and drops expired ones. A 64 KiB TCP answer weighs as much as a few hundred small ones."""

    def __init__(self, max_entries: int, max_bytes: int = MAX_BYTES,
                 serve_stale: bool = False) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.serve_stale = serve_stale  # expired entries are kept (bounded) to be served stale
        self.bytes = 0
        self._entries: OrderedDict[CacheKey, CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            if not self.serve_stale or entry.servfail or now >= self._stale_limit(entry):
                del self._entries[key]
                self.bytes -= entry_bytes(entry)
            return None
        self._entries.move_to_end(key)
        return entry

    @staticmethod
    def _stale_limit(entry: CacheEntry) -> float:
        return entry.stale_until or entry.expires_at + STALE_MAX_AGE

    def stale(self, key: CacheKey, now: float) -> CacheEntry | None:
        """Every upstream failed: the expired answer for key, as a stale answer (TTLs of
        STALE_TTL, EDE 3), cached as such for STALE_TTL; None when there is none (or serve-stale
        is off, or it is too old)."""
        entry = self._entries.get(key)
        if (entry is None or not self.serve_stale or entry.servfail
                or now >= self._stale_limit(entry)):
            return None
        ede = entry.ede + ede_option(EDE_STALE_ANSWER, "") if not entry.stale else entry.ede
        stale = CacheEntry(set_ttls(entry.wire, entry.ttl_offsets, STALE_TTL),
                           entry.ttl_offsets, now, now + STALE_TTL, entry.question_end,
                           entry.chain_rule, entry.additional_at, ede, stale=True,
                           stale_until=self._stale_limit(entry))
        self.put(key, stale)
        return stale

    def put(self, key: CacheKey, entry: CacheEntry) -> None:
        if self.max_entries <= 0 or entry.expires_at <= entry.stored_at:
            return
        size = entry_bytes(entry)
        if size > self.max_bytes:
            return
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self.bytes -= entry_bytes(old)
        entries[key] = entry
        self.bytes += size
        self._shrink()

    def _shrink(self) -> None:
        entries = self._entries
        while len(entries) > max(self.max_entries, 0) or self.bytes > self.max_bytes:
            self.bytes -= entry_bytes(entries.popitem(last=False)[1])

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def resize(self, max_entries: int, max_bytes: int | None = None,
               serve_stale: bool | None = None) -> None:
        self.max_entries = max_entries
        if max_bytes is not None:
            self.max_bytes = max_bytes
        if serve_stale is not None:
            self.serve_stale = serve_stale
        self._shrink()
