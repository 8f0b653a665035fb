"""The query path: bytes in, bytes out, through stages in one order, leaving by one exit.

    read → rate limit → serve at all? → classify client and decide → cache → forward → finish

- **read**: the question and EDNS straight from the wire (dns/wire.py); what cannot be read is
  answered FORMERR/NOTIMP/BADVERS (or dropped, when it is not a query at all) and counted.
- **rate limit** (UDP, when `dns.rate_limit_qps` is set): a client over its budget gets
  REFUSED, or TC=1 every second time (dns/ratelimit.py); before anything else costs work.
- **serve at all?**: what a forwarder does not pass on, whoever asks (docs/design.md §5): RD=0 (no
  cache snooping), zone transfers, classes other than IN (CH `version.bind` would reveal the
  upstream's version). REFUSED.
- **decide**: the client is classified before the list is consulted (the same name is blocked
  for one client and resolved for another); PolicyEngine.decide. CNAME/DNAME chains are decided
  by the engine too (`after_chain`), once the answer is known, so a Decision always tells the
  truth about what the client got.
- **cache**: after the decision, never before it, so a cached answer is never served to a
  client that policy blocks.
- **forward**: the upstream pool (the only stage that awaits).
- **finish**: the one exit. It counts the query under its decision, opens incidents, tells the
  network backstop and records the latency. Everything that leaves goes through it, and anything
  unexpected on the way becomes SERVFAIL, counted as `decision="error"` and logged once per cause.

Blocked and cached answers are returned synchronously (no task, no await); only a cache miss
becomes a coroutine.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from tiktokguard.dns.answers import DDR_NAME
from tiktokguard.dns.cache import (
    SERVFAIL_TTL,
    AnswerCache,
    CacheEntry,
    cache_key,
    cache_ttl,
    cap_negative,
    cap_ttls,
)
from tiktokguard.dns.ratelimit import RateLimiter
from tiktokguard.dns.runtime import Runtime
from tiktokguard.dns.upstream import AllUpstreamsFailed
from tiktokguard.dns.wire import (
    BADVERS,
    CD,
    CLASS_IN,
    EDE_NETWORK_ERROR,
    NOTIMP,
    RD,
    REFUSED,
    SERVFAIL,
    TYPE_AXFR,
    TYPE_IXFR,
    DropPacket,
    Query,
    QueryError,
    RecordIndex,
    bare_response,
    chain_names,
    ede_option,
    error_response,
    parse_query,
    response,
    strip_opt,
    truncated_response,
)
from tiktokguard.logs import get_logger
from tiktokguard.metrics import Metrics
from tiktokguard.policy.clients import ClientClass, mac_to_text
from tiktokguard.policy.engine import Decision, Verdict

log = get_logger()
Result = bytes | None | Coroutine[Any, Any, bytes | None]
_ZONE_TRANSFERS = (TYPE_AXFR, TYPE_IXFR)
ERROR_LOG_INTERVAL = 60.0  # an unexpected failure's traceback, at most once a minute per cause
ERROR_CAUSES_KEPT = 256
_NOT_AUTHORITATIVE = (20, "")
# Decisions for what leaves before the policy is asked: not served at all (rate limit, RD=0,
# zone transfers, other classes), and queries that could not be read.
_NOT_SERVED = Decision(Verdict.REFUSED, ClientClass.REFUSED)
_MALFORMED = Decision(Verdict.MALFORMED, ClientClass.REFUSED)


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


class Pipeline:
    def __init__(self, runtime: Runtime, cache: AnswerCache, metrics: Metrics,
                 incidents: IncidentSink | None = None, macs: MacSource | None = None,
                 backstop: AddressLearner | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        # Replaced whole by a reload (dns/runtime.py); read once per stage, never written into.
        self.runtime = runtime
        self.cache = cache
        self.metrics = metrics
        self.incidents = incidents
        self.macs = macs
        self.clock = clock
        self.stats = metrics.stats
        self.backstop = backstop
        self._errors_logged: dict[tuple[str, str, int], float] = {}

    # -- read, serve at all?, decide, cache ----------------------------------------------------

    def handle(self, data: bytes, client_ip: str, transport: str) -> Result:
        """The answer to one query: bytes now, None to send nothing (a counted drop), or a
        coroutine to await. client_ip is normalised by the listener
        (policy.clients.client_address)."""
        started = time.perf_counter()
        try:
            query = parse_query(data)
        except DropPacket:
            self.stats.malformed["short"] += 1
            return None
        except QueryError as err:
            reason = {NOTIMP: "notimp", BADVERS: "badvers"}.get(err.rcode, "formerr")
            self.stats.malformed[reason] += 1
            return self.finish(err.query, _MALFORMED, error_response(err), client_ip, None,
                               transport, 0.0, started)
        except Exception as exc:  # a bug in the reader: the packet is all we can echo
            return self._failed(None, data, transport, started, exc)
        try:
            rt = self.runtime
            ratelimit = rt.ratelimit
            if (ratelimit is not None and transport == "udp"
                    and not ratelimit.allow(client_ip, time.monotonic())):
                return self._limited(query, ratelimit, client_ip, started)
            if not query.flags & RD or query.qclass != CLASS_IN or query.qtype in _ZONE_TRANSFERS:
                return self._refuse(query, client_ip, transport, started)
            now = self.clock()
            engine = rt.engine
            mac = (None if query.mac is None and not engine.classifier.devices.has_macs
                   else self._mac(query, client_ip))
            decision = engine.decide(client_ip, mac, query.qname, now)
            verdict = decision.verdict
            if rt.ddr is not None and query.qname == DDR_NAME and verdict != Verdict.REFUSED:
                # Discovery of Designated Resolvers: our own encrypted endpoints, for every
                # client we serve (managed ones too: they upgrade to us, to no one else).
                return self.finish(query, Decision(Verdict.ALLOWED, decision.client_class),
                                   rt.ddr.answer(query), client_ip, mac, transport, now,
                                   started)
            if verdict == Verdict.REFUSED:
                return self.finish(query, decision, response(query, REFUSED), client_ip, mac,
                                   transport, now, started)
            if verdict == Verdict.BLOCKED:
                if mac is None and self._may_learn_mac(client_ip):
                    return self._decide_after_learning(query, client_ip, transport, now,
                                                       started)
                wire = (rt.blocks.blocked(query, decision.rule)  # type: ignore[arg-type]
                        if decision.countermeasure_rcode is None
                        else self._blocked(query, decision))
                return self.finish(query, decision, wire, client_ip, mac, transport, now, started)
            return self._resolve(query, decision, client_ip, mac, transport, now, started)
        except Exception as exc:
            return self._failed(query, data, transport, started, exc)

    def _limited(self, query: Query, ratelimit: RateLimiter, client_ip: str,
                 started: float) -> bytes:
        """Over the client's rate: REFUSED, and TC=1 every second time (a real client retries
        over TCP; a spoofed source cannot)."""
        self.stats.rate_limited += 1
        wire = (truncated_response(query) if ratelimit.slip(client_ip)
                else response(query, REFUSED))
        return self.finish(query, _NOT_SERVED, wire, client_ip, None, "udp", 0.0, started)

    def _refuse(self, query: Query, client_ip: str, transport: str, started: float) -> bytes:
        """REFUSED for what a forwarder does not pass on, whoever asks: RD=0 (cache snooping,
        refused as unbound's default access control does; it must neither reach the upstream
        nor leave a negative entry for RD=1 clients), AXFR/IXFR, and classes other than IN."""
        # RFC 8914 §4.21: EDE 20 "Not Authoritative" is for exactly this (unbound sends it too).
        wire = response(query, REFUSED, ede=_NOT_AUTHORITATIVE if not query.flags & RD else None)
        return self.finish(query, _NOT_SERVED, wire, client_ip, None, transport, 0.0, started)

    def _resolve(self, query: Query, decision: Decision, client_ip: str, mac: str | None,
                 transport: str, now: float, started: float
                 ) -> bytes | Coroutine[Any, Any, bytes | None]:
        """A query the policy lets through: from the cache, or from the upstreams."""
        entry = self.cache.get((query.qname, query.qtype, query.qclass, query.do,
                                query.flags & CD), now)  # (cache_key, inline)
        if entry is None:
            self.stats.cache_misses += 1
            return self._forward(query, decision, client_ip, mac, transport, started)
        self.stats.cache_hits += 1
        return self._from_cache(query, decision, entry, client_ip, mac, transport, now, started)

    def _from_cache(self, query: Query, decision: Decision, entry: CacheEntry, client_ip: str,
                    mac: str | None, transport: str, now: float, started: float) -> bytes:
        if entry.chain_rule is not None:
            decision = self.runtime.engine.after_chain(decision, entry.chain_rule)
            if decision.verdict == Verdict.BLOCKED:
                return self.finish(query, decision, self._blocked(query, decision), client_ip,
                                   mac, transport, now, started)
        if entry.servfail:
            decision = self._error(decision)
        elif entry.stale:
            self.stats.stale_answers += 1
        return self.finish(query, decision, entry.answer(query, now, transport == "udp"),
                           client_ip, mac, transport, now, started)

    def _mac(self, query: Query, client_ip: str) -> str | None:
        # A MAC from EDNS is believed only from a configured relay (docs/design.md §1): anyone else
        # could claim a social media device's MAC.
        if query.mac is not None and self.runtime.engine.classifier.trusts_mac_from(client_ip):
            return mac_to_text(query.mac)
        if self.macs is not None and self.runtime.engine.classifier.devices.has_macs:
            return self.macs.mac_of(client_ip)
        return None

    def _may_learn_mac(self, client_ip: str) -> bool:
        macs = self.macs
        return (macs is not None and self.runtime.engine.classifier.devices.has_macs
                and macs.unknown(client_ip))

    async def _decide_after_learning(self, query: Query, client_ip: str, transport: str,
                                     now: float, started: float) -> bytes | None:
        """A managed client we are about to block, whose MAC we have not seen: it may be a
        social media device that just joined. Read the neighbour table once more (bounded)
        before deciding, so the device does not get a block answer it would cache."""
        try:
            assert self.macs is not None
            mac = await self.macs.learn(client_ip)
            decision = self.runtime.engine.decide(client_ip, mac, query.qname, now)
            if decision.verdict == Verdict.BLOCKED:
                return self.finish(query, decision, self._blocked(query, decision), client_ip,
                                   mac, transport, now, started)
            result = self._resolve(query, decision, client_ip, mac, transport, now, started)
            return result if isinstance(result, bytes) else await result
        except Exception as exc:
            return self._failed(query, b"", transport, started, exc)

    def _blocked(self, query: Query, decision: Decision) -> bytes:
        rule = decision.rule or ""
        if decision.countermeasure_rcode is not None:
            return self.runtime.blocks.countermeasure(query, decision.countermeasure_rcode, rule)
        return self.runtime.blocks.blocked(query, rule)

    @staticmethod
    def _error(decision: Decision) -> Decision:
        return Decision(Verdict.ERROR, decision.client_class, decision.rule, decision.device)

    # -- forward ------------------------------------------------------------------------------

    async def _forward(self, query: Query, decision: Decision, client_ip: str, mac: str | None,
                       transport: str, started: float) -> bytes | None:
        try:
            try:
                pool = self.runtime.pool_for(query.qname)
                reply = await pool.resolve(query.qname, query.qtype, query.qclass, query.flags,
                                           query.do)
            except AllUpstreamsFailed as exc:
                now = self.clock()
                stale = self.cache.stale(cache_key(query), now)
                if stale is not None:  # RFC 8767: an expired answer beats SERVFAIL
                    return self._from_cache(query, decision, stale, client_ip, mac, transport,
                                            now, started)
                # RFC 9520 §3.2: remember the failure briefly, so a retry storm does not hit
                # upstreams that are already failing.
                # The clients served from it get the same EDE as this one.
                failure = bare_response(query, SERVFAIL)
                ede = ede_option(EDE_NETWORK_ERROR, f"upstreams failed: {exc}")
                entry = CacheEntry(failure, (), now, now + SERVFAIL_TTL, len(failure), ede=ede,
                                   servfail=True)
                self.cache.put(cache_key(query), entry)
                return self.finish(query, self._error(decision),
                                   entry.answer(query, now, transport == "udp"), client_ip, mac,
                                   transport, now, started)
            now = self.clock()
            rt = self.runtime  # (the one in force now that the answer is here)
            wire, index = strip_opt(reply.wire, reply.index)
            try:
                # CNAME inspection (docs/design.md §2) reads every owner and CNAME/DNAME target.
                chain_rule = (rt.engine.chain_rule(chain_names(wire, index))
                              if index.other_names else None)
            except ValueError:
                # A name that cannot be read: nobody gets the answer (for a managed client,
                # this is failing closed), and the upstream is said to have sent junk.
                self.stats.count_upstream_error(reply.upstream.name, "malformed")
                return self.finish(query, self._error(decision), response(query, SERVFAIL),
                                   client_ip, mac, transport, now, started)
            wire = cap_ttls(wire, index.ttl_offsets, rt.max_ttl)
            wire = cap_negative(wire, index, rt.max_negative_ttl)
            entry = CacheEntry(wire, index.ttl_offsets, now,
                               now + cache_ttl(index, rt.max_ttl, rt.max_negative_ttl),
                               index.question_end, chain_rule,
                               index.additional_at if index.arcount else 0, index.ede,
                               index.rcode == SERVFAIL)
            self.cache.put(cache_key(query), entry)
            if self.backstop is not None and (decision.rule is not None or chain_rule is not None):
                self.backstop.answer(wire, index)  # a listed name's addresses, for the kernel sets
            decision = rt.engine.after_chain(decision, chain_rule)
            if decision.verdict == Verdict.BLOCKED:
                out = self._blocked(query, decision)
            else:
                if index.rcode == SERVFAIL:
                    decision = self._error(decision)
                out = entry.answer(query, now, transport == "udp")
            return self.finish(query, decision, out, client_ip, mac, transport, now, started)
        except Exception as exc:
            return self._failed(query, b"", transport, started, exc)

    # -- finish: the one exit -----------------------------------------------------------------

    def finish(self, query: Query | None, decision: Decision, wire: bytes, client_ip: str,
               mac: str | None, transport: str, now: float, started: float) -> bytes:
        """Record what happened to the query, from its decision alone, and hand back its answer.
        Incidents and the backstop only note the event here; their work happens elsewhere."""
        stats = self.stats
        verdict = decision.verdict
        stats.queries[transport, verdict] += 1
        if verdict == Verdict.BLOCKED:
            rule = decision.rule or ""
            blocked = stats.blocked
            blocked[rule] = blocked.get(rule, 0) + 1
            if decision.countermeasure_rcode is None and query is not None:
                if self.incidents is not None:
                    self.incidents.blocked(client_ip, mac, query, rule, now)
                if self.backstop is not None:
                    self.backstop.blocked(query.qname)
        stats.observe(time.perf_counter() - started)
        return wire

    def _failed(self, query: Query | None, data: bytes, transport: str, started: float,
                exc: Exception) -> bytes | None:
        """Anything unexpected: SERVFAIL (never a silent drop), counted, logged once per cause
        a minute. Must not raise itself."""
        try:
            self.stats.queries[transport, Verdict.ERROR] += 1
            self.stats.observe(time.perf_counter() - started)
            self._log_failure(exc)
            if query is not None:
                return response(query, SERVFAIL)
            if len(data) >= 12 and not data[2] & 0x80:
                # Header with QR and SERVFAIL, the query's ID and its RD, no sections.
                return data[:2] + bytes([0x80 | (data[2] & 0x01), 0x80 | SERVFAIL]) + bytes(8)
        except Exception:  # nothing more can be done for this query
            pass
        return None

    def _log_failure(self, exc: Exception) -> None:
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        cause = (type(exc).__name__, frame.filename if frame else "",
                 (frame.lineno or 0) if frame else 0)
        now = time.monotonic()
        logged = self._errors_logged
        if now - logged.get(cause, -ERROR_LOG_INTERVAL) < ERROR_LOG_INTERVAL:
            return
        if len(logged) >= ERROR_CAUSES_KEPT and cause not in logged:
            logged.clear()
        logged[cause] = now
        log.error("query_failed", error=f"{type(exc).__name__}: {exc}",
                  traceback="".join(traceback.format_exception(exc)))


__all__ = ["AddressLearner", "IncidentSink", "MacSource", "Pipeline"]
