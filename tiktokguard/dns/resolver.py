"""The query path: bytes in, bytes out. One place where every stage is called in order:

    read question → classify client → decide → (block answer | cache → upstream → CNAME check)

The order matters: the client is classified before the list is consulted (the same name is
blocked for one client and resolved for another), and the cache sits *after* the policy decision,
so a cached answer is never served to a client that policy blocks. Blocked and cached answers are
returned synchronously (no task, no await); only a cache miss becomes a coroutine.

Errors become DNS codes here and only here: malformed → FORMERR/NOTIMP/BADVERS (or a silent drop),
all upstreams failed → SERVFAIL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import dnslib

from tiktokguard.dns.answers import BlockAnswers
from tiktokguard.dns.cache import SERVFAIL_TTL, AnswerCache, CacheEntry, CacheKey, cache_ttl
from tiktokguard.dns.upstream import AllUpstreamsFailed, UpstreamPool
from tiktokguard.dns.wire import (
    BADVERS,
    NOTIMP,
    REFUSED,
    SERVFAIL,
    DropPacket,
    Query,
    QueryError,
    RecordIndex,
    bare_response,
    error_response,
    parse_query,
    response,
    strip_opt,
)
from tiktokguard.metrics import Metrics
from tiktokguard.policy.clients import ClientClass, mac_to_text
from tiktokguard.policy.engine import Decision, PolicyEngine, Verdict

EDE_NETWORK_ERROR = 23  # RFC 8914 §4.24: no upstream could be reached
Result = bytes | None | Coroutine[Any, Any, bytes | None]


class IncidentSink(Protocol):
    """Receives every blocked query of a managed client (aggregation is the sink's job)."""

    def blocked(self, client_ip: str, mac: str | None, query: Query, rule: str,
                now: float) -> None: ...


class AddressLearner(Protocol):
    """The network-level backstop: learns addresses of blocked names (netfilter.Backstop)."""

    def answer(self, wire: bytes, index: RecordIndex) -> None: ...

    def blocked(self, qname: bytes) -> None: ...


class MacSource(Protocol):
    """Where a client's MAC comes from when the query does not carry one (neighbour table)."""

    def mac_of(self, client_ip: str) -> str | None: ...

    def unknown(self, client_ip: str) -> bool: ...

    async def learn(self, client_ip: str) -> str | None: ...


class Resolver:
    def __init__(self, engine: PolicyEngine, cache: AnswerCache, pool: UpstreamPool,
                 blocks: BlockAnswers, metrics: Metrics, incidents: IncidentSink | None = None,
                 macs: MacSource | None = None, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.cache = cache
        self.pool = pool
        self.blocks = blocks
        self.metrics = metrics
        self.incidents = incidents
        self.macs = macs
        self.clock = clock
        self.stats = metrics.stats
        self.backstop: AddressLearner | None = None

    def handle(self, data: bytes, client_ip: str, transport: str) -> Result:
        """The answer to one query: bytes now, None to send nothing, or a coroutine to await."""
        started = time.perf_counter()
        try:
            query = parse_query(data)
        except DropPacket:
            self.stats.malformed["short"] += 1
            return None
        except QueryError as err:
            reason = {NOTIMP: "notimp", BADVERS: "badvers"}.get(err.rcode, "formerr")
            self.stats.malformed[reason] += 1
            self.stats.queries[transport, Verdict.ERROR] += 1
            self.stats.observe(time.perf_counter() - started)
            return error_response(err)
        now = self.clock()
        mac = (None if query.mac is None and not self.engine.classifier.devices.has_macs
               else self._mac(query, client_ip))
        decision = self.engine.decide(client_ip, mac, query.qname, now)
        verdict = decision.verdict
        if verdict == Verdict.REFUSED:
            self.stats.queries[transport, verdict] += 1
            self.stats.observe(time.perf_counter() - started)
            return response(query, REFUSED)
        if verdict == Verdict.BLOCKED:
            if mac is None and self._may_learn_mac(client_ip):
                return self._decide_after_learning(query, client_ip, transport, now, started)
            return self._block(query, decision, decision.rule or "", client_ip, mac, transport,
                               now, started)
        return self._resolve(query, decision, client_ip, mac, transport, now, started)

    def _resolve(self, query: Query, decision: Decision, client_ip: str, mac: str | None,
                 transport: str, now: float, started: float) -> bytes | Coroutine[Any, Any, bytes]:
        """A query the policy lets through: from the cache, or from the upstreams."""
        entry = self.cache.get(self._key(query), now)
        if entry is not None:
            self.stats.cache_hits += 1
            if entry.chain_rule is not None and decision.client_class is ClientClass.MANAGED:
                return self._block(query, decision, entry.chain_rule, client_ip, mac, transport,
                                   now, started)
            wire = entry.answer(query, now, transport == "udp")
            self.stats.queries[transport, decision.verdict] += 1
            self.stats.observe(time.perf_counter() - started)
            return wire
        self.stats.cache_misses += 1
        return self._forward(query, decision, client_ip, mac, transport, started)

    @staticmethod
    def _key(query: Query) -> CacheKey:
        return (query.qname, query.qtype, query.qclass, query.do)

    def _mac(self, query: Query, client_ip: str) -> str | None:
        # A MAC from EDNS is believed only from a configured relay (DESIGN §1): anyone else
        # could claim a social media device's MAC.
        if query.mac is not None and self.engine.classifier.trusts_mac_from(client_ip):
            return mac_to_text(query.mac)
        if self.macs is not None and self.engine.classifier.devices.has_macs:
            return self.macs.mac_of(client_ip)
        return None

    def _may_learn_mac(self, client_ip: str) -> bool:
        macs = self.macs
        return (macs is not None and self.engine.classifier.devices.has_macs
                and macs.unknown(client_ip))

    async def _decide_after_learning(self, query: Query, client_ip: str, transport: str,
                                     now: float, started: float) -> bytes:
        """A managed client we are about to block, whose MAC we have not seen: it may be a
        social media device that just joined. Read the neighbour table once more (bounded)
        before deciding, so the device does not get a block answer it would cache."""
        assert self.macs is not None
        mac = await self.macs.learn(client_ip)
        decision = self.engine.decide(client_ip, mac, query.qname, now)
        if decision.verdict == Verdict.BLOCKED:
            return self._block(query, decision, decision.rule or "", client_ip, mac, transport,
                               now, started)
        result = self._resolve(query, decision, client_ip, mac, transport, now, started)
        return result if isinstance(result, bytes) else await result

    def _block(self, query: Query, decision: Decision, rule: str, client_ip: str,
               mac: str | None, transport: str, now: float, started: float) -> bytes:
        stats = self.stats
        stats.queries[transport, Verdict.BLOCKED] += 1
        stats.blocked[rule] = stats.blocked.get(rule, 0) + 1
        if decision.countermeasure_rcode is not None:
            wire = self.blocks.countermeasure(query, decision.countermeasure_rcode, rule)
        else:
            wire = self.blocks.blocked(query, rule)
            if self.incidents is not None:
                self.incidents.blocked(client_ip, mac, query, rule, now)
            if self.backstop is not None:
                self.backstop.blocked(query.qname)
        stats.observe(time.perf_counter() - started)
        return wire

    async def _forward(self, query: Query, decision: Decision, client_ip: str, mac: str | None,
                       transport: str, started: float) -> bytes:
        try:
            reply = await self.pool.resolve(query.qname, query.qtype, query.qclass, query.flags,
                                            query.do)
        except AllUpstreamsFailed as exc:
            # RFC 9520 §3.2: remember the failure briefly, so a retry storm does not hit
            # upstreams that are already failing.
            now = self.clock()
            failure = bare_response(query, SERVFAIL)
            self.cache.put(self._key(query), CacheEntry(failure, (), now, now + SERVFAIL_TTL,
                                                        len(failure)))
            self.stats.queries[transport, Verdict.ERROR] += 1
            self.stats.observe(time.perf_counter() - started)
            return response(query, SERVFAIL, ede=(EDE_NETWORK_ERROR, f"upstreams failed: {exc}"))
        now = self.clock()
        wire, index = strip_opt(reply.wire, reply.index)
        chain_rule = self._chain_rule(wire) if index.other_names else None
        entry = CacheEntry(wire, index.ttl_offsets, now, now + cache_ttl(index),
                           index.question_end, chain_rule)
        self.cache.put(self._key(query), entry)
        if self.backstop is not None and (decision.rule is not None or chain_rule is not None):
            self.backstop.answer(wire, index)  # a listed name's addresses, for the kernel sets
        if chain_rule is not None and decision.client_class is ClientClass.MANAGED:
            return self._block(query, decision, chain_rule, client_ip, mac, transport, now,
                               started)
        out = entry.answer(query, now, transport == "udp")
        self.stats.queries[transport, decision.verdict] += 1
        self.stats.observe(time.perf_counter() - started)
        return out

    def _chain_rule(self, wire: bytes) -> str | None:
        """CNAME inspection (DESIGN §2): a blocked owner name or CNAME/DNAME target anywhere in
        the answer section makes the whole answer blocked for managed clients."""
        try:
            message = dnslib.DNSRecord.parse(wire)
        except (dnslib.DNSError, ValueError, IndexError, KeyError):
            return None
        names = []
        for rr in message.rr:
            names.append(str(rr.rname))
            if rr.rtype in (dnslib.QTYPE.CNAME, dnslib.QTYPE.DNAME):
                names.append(str(rr.rdata.label))
        return self.engine.chain_rule(names)
