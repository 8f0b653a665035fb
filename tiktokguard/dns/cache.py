"""Answer cache: bounded LRU of upstream answers in wire form, no I/O, time passed in.

Entries keep the response bytes (without the upstream's OPT) and the offsets of their TTL fields,
so a hit is served by patching the ID, the question's case and the TTLs: no parse, no pack.
Keyed on (lower-cased wire name, type, class, DO bit). Negative answers are cached for
min(SOA TTL, SOA MINIMUM) as RFC 2308 §5 says; failures only briefly (RFC 9520 §3.2).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

from tiktokguard.dns.wire import (
    NOERROR,
    NXDOMAIN,
    SERVFAIL,
    Query,
    RecordIndex,
    opt_record,
    truncate_for_udp,
)

MAX_TTL = 86_400  # never keep an answer longer than a day, whatever the upstream says
NEGATIVE_TTL_WITHOUT_SOA = 30  # a negative answer without SOA: RFC 2308 §5 says "SHOULD NOT" cache
SERVFAIL_TTL = 5  # RFC 9520: cache resolution failures at least 1 s, and not for long

CacheKey = tuple[bytes, int, int, bool]
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


_OPT = {do: opt_record(do) for do in (False, True)}


@dataclass(slots=True)
class CacheEntry:
    wire: bytes  # response without OPT; ID and question case are patched per client
    ttl_offsets: tuple[int, ...]
    stored_at: float
    expires_at: float
    question_end: int
    chain_rule: str | None = None  # CNAME inspection: a blocked name this answer leads to
    _age: int = -1
    _body: bytes = b""  # the records after the question, TTLs counted down by _age seconds
    _head_opt: bytes = b""  # flags and counts with ARCOUNT + 1, for an answer that gets OPT

    def answer(self, query: Query, now: float, udp: bool) -> bytes:
        """This answer for one client: its ID, its question bytes (its case), TTLs counted
        down, our OPT when it asked with EDNS, truncated to its UDP size."""
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
        if query.edns:
            if not self._head_opt:
                arcount = _U16.unpack_from(self.wire, 10)[0]
                self._head_opt = self.wire[2:10] + _U16.pack(arcount + 1)
            out = (_U16.pack(query.id) + self._head_opt + query.question + self._body
                   + _OPT[query.do])
        else:
            out = _U16.pack(query.id) + self.wire[2:12] + query.question + self._body
        if udp and len(out) > query.max_udp_response():
            return truncate_for_udp(query, out)
        return out


def cache_ttl(index: RecordIndex) -> int:
    """How long an upstream answer may be cached, in whole seconds (0: do not cache)."""
    if index.rcode == SERVFAIL:
        return SERVFAIL_TTL
    if index.rcode == NXDOMAIN or (index.rcode == NOERROR and index.ancount == 0):
        ttl = index.negative_ttl if index.negative_ttl is not None else NEGATIVE_TTL_WITHOUT_SOA
        return min(ttl, MAX_TTL)
    if index.rcode != NOERROR:
        return 0  # REFUSED, NOTIMP, ...: the next upstream or the next try may do better
    if index.min_ttl is None:
        return 0
    return min(index.min_ttl, MAX_TTL)


class AnswerCache:
    """LRU over CacheEntry; `get` returns only live entries and drops expired ones."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: CacheKey, entry: CacheEntry) -> None:
        if self.max_entries <= 0 or entry.expires_at <= entry.stored_at:
            return
        entries = self._entries
        entries[key] = entry
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def resize(self, max_entries: int) -> None:
        self.max_entries = max_entries
        while len(self._entries) > max(max_entries, 0):
            self._entries.popitem(last=False)
