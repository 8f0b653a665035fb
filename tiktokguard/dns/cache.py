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

from tiktokguard.dns.wire import NOERROR, NXDOMAIN, SERVFAIL, RecordIndex

MAX_TTL = 86_400  # never keep an answer longer than a day, whatever the upstream says
NEGATIVE_TTL_WITHOUT_SOA = 30  # a negative answer without SOA: RFC 2308 §5 says "SHOULD NOT" cache
SERVFAIL_TTL = 5  # RFC 9520: cache resolution failures at least 1 s, and not for long

CacheKey = tuple[bytes, int, int, bool]
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


@dataclass(slots=True)
class CacheEntry:
    wire: bytes  # response without OPT; ID and question case are patched per client
    ttl_offsets: tuple[int, ...]
    stored_at: float
    expires_at: float
    question_end: int
    chain_rule: str | None = None  # CNAME inspection: a blocked name this answer leads to

    def render(self, qid: int, question: bytes, now: float) -> bytes:
        """The cached answer for one client: its ID, its question bytes, TTLs counted down."""
        out = bytearray(self.wire)
        _U16.pack_into(out, 0, qid)
        out[12:self.question_end] = question
        elapsed = int(now - self.stored_at)
        if elapsed > 0:
            for offset in self.ttl_offsets:
                ttl = _U32.unpack_from(out, offset)[0]
                _U32.pack_into(out, offset, ttl - elapsed if ttl > elapsed else 0)
        return bytes(out)


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
