"""The policy decision: who asks (client class) and what is asked (list match) → Decision.

Pure: no I/O, time passed in. The table is docs/design.md §1; the university's TikTok policy
(docs/policy.md) decides it: "The use of TikTok on a device provided by the university ... is
prohibited", including "the web version"; a social media device is the one exception; privately
owned devices "may be used as individuals see fit".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tiktokguard.dnsname import NOERROR, NXDOMAIN, text_to_wire
from tiktokguard.policy.clients import ClientClass, ClientClassifier, Device, client_address
from tiktokguard.policy.domains import DomainMatcher, normalise_domain


class Verdict:
    """The `decision` label of tiktokguard_dns_queries_total. Plain strings, not an Enum: they
    key the per-query counters, and an Enum member's hash is a Python-level call."""

    ALLOWED = "allowed"
    BLOCKED = "blocked"
    ALLOWLISTED = "allowlisted"
    UNMANAGED = "unmanaged"
    REFUSED = "refused"
    ERROR = "error"
    ALL = (ALLOWED, BLOCKED, ALLOWLISTED, UNMANAGED, REFUSED, ERROR)
    # A query that could not be read: counted by reason in tiktokguard_malformed_queries_total
    # only, not as a decision (junk from one client must not look like SERVFAILs we gave).
    MALFORMED = "malformed"


# docs/design.md §2 bypass countermeasures, by exact name: what each is answered with, and why.
COUNTERMEASURES: dict[str, tuple[int, str]] = {
    # Mozilla's canary domain: NXDOMAIN turns off Firefox's automatic DNS over HTTPS.
    "use-application-dns.net": (NXDOMAIN, "Firefox DoH canary"),
    # Apple: NXDOMAIN for these makes iCloud Private Relay fall back to the network's resolver.
    "mask.icloud.com": (NXDOMAIN, "iCloud Private Relay"),
    "mask-h2.icloud.com": (NXDOMAIN, "iCloud Private Relay"),
    # RFC 9462 Discovery of Designated Resolvers: NODATA means "no encrypted resolver here".
    "_dns.resolver.arpa": (NOERROR, "resolver discovery (DDR)"),
}
_COUNTERMEASURES_WIRE = {text_to_wire(k): (k, v[0]) for k, v in COUNTERMEASURES.items()}


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: str  # a Verdict
    client_class: ClientClass
    rule: str | None = None  # the list entry or countermeasure name that matched
    device: Device | None = None  # the allowlisted device, when the client is one
    countermeasure_rcode: int | None = None  # set when a bypass countermeasure answers
    exception: str | None = None  # the exception that allowed the name (CLI and API only)

    @property
    def blocks(self) -> bool:
        return self.verdict == Verdict.BLOCKED

    def explain(self) -> str:
        """One line for people (CLI, API)."""
        parts = [self.verdict, f"client={self.client_class.value}"]
        if self.rule:
            parts.append(f"rule={self.rule}")
        if self.exception:
            parts.append(f"exception={self.exception}")
        if self.device:
            parts.append(f"device={self.device.id} ({self.device.name})")
        return " ".join(parts)


def query_name(text: str) -> str:
    """A name as people type it (CLI `check`, API `decision`), checked: a URL or an address
    with a path is refused with a hint, not decided as a name no one will ever ask for.
    ValueError."""
    stripped = text.strip()
    if "://" in stripped or "/" in stripped or "@" in stripped:
        host = stripped.split("://", 1)[-1].split("/", 1)[0].split("@")[-1].split(":")[0]
        raise ValueError(f"{text!r} is not a DNS name (a URL or a mail address?); the name in "
                         f"it is {host!r}")
    try:
        return normalise_domain(stripped) if stripped not in (".", "") else stripped
    except ValueError as exc:
        raise ValueError(f"{exc} (a DNS name, such as www.tiktok.com)") from None


_REFUSED = Decision(Verdict.REFUSED, ClientClass.REFUSED)
_MANAGED_ALLOWED = Decision(Verdict.ALLOWED, ClientClass.MANAGED)
_UNMANAGED_ALLOWED = Decision(Verdict.ALLOWED, ClientClass.UNMANAGED)


class PolicyEngine:
    """Decides queries. The matcher can be swapped (list reload) by assigning `matcher`."""

    def __init__(self, matcher: DomainMatcher, classifier: ClientClassifier,
                 countermeasures: bool = True, doh: DomainMatcher | None = None) -> None:
        self.matcher = matcher
        self.classifier = classifier
        self.countermeasures = countermeasures
        # Public DoH/DoT resolvers' names, blocked for managed clients (policy.block_public_doh)
        self.doh = doh
        self._blocked: dict[str, Decision] = {}  # one immutable Decision per rule, reused

    def _block(self, rule: str) -> Decision:
        decision = self._blocked.get(rule)
        if decision is None:
            if len(self._blocked) > 100_000:
                self._blocked.clear()
            decision = self._blocked[rule] = Decision(Verdict.BLOCKED, ClientClass.MANAGED, rule)
        return decision

    def decide(self, client_ip: str, mac: str | None, qname: bytes, now: float) -> Decision:
        """The decision for a query name (lower-cased wire form) from this client at now."""
        client_class, device = self.classifier.classify(client_ip, mac, now)
        if client_class is ClientClass.REFUSED:
            return _REFUSED
        rule = self.matcher.match(qname)
        if client_class is ClientClass.MANAGED:
            if rule is not None:
                return self._block(rule)
            if self.countermeasures:
                hit = _COUNTERMEASURES_WIRE.get(qname)
                if hit is not None:
                    return Decision(Verdict.BLOCKED, client_class, hit[0],
                                    countermeasure_rcode=hit[1])
            if self.doh is not None:
                entry = self.doh.match(qname)
                if entry is not None:
                    # A bypass, not TikTok: answered like the countermeasures (NXDOMAIN, EDE 17
                    # Filtered), with no incident and no shadow resolution.
                    return Decision(Verdict.BLOCKED, client_class, entry,
                                    countermeasure_rcode=NXDOMAIN)
            return _MANAGED_ALLOWED
        if client_class is ClientClass.ALLOWLISTED:
            # Only TikTok/ByteDance names count as `allowlisted`: that is the exemption in use.
            verdict = Verdict.ALLOWLISTED if rule is not None else Verdict.ALLOWED
            return Decision(verdict, client_class, rule, device)
        if rule is not None:
            return Decision(Verdict.UNMANAGED, client_class, rule)
        return _UNMANAGED_ALLOWED

    def decide_text(self, client_ip: str, name: str, now: float, mac: str | None = None
                    ) -> Decision:
        """decide() for a name in presentation form (CLI `check`, API `decision`), naming the
        exception that allowed it when one did (the query path does not look that up)."""
        qname = text_to_wire(query_name(name))
        decision = self.decide(client_address(client_ip), mac, qname, now)
        if decision.rule is None and decision.verdict != Verdict.REFUSED:
            exception = self.matcher.exception_for(qname)
            if exception is None and self.doh is not None:
                exception = self.doh.exception_for(qname)
            if exception is not None:
                decision = replace(decision, exception=exception)
        return decision

    def chain_rule(self, names: list[bytes]) -> str | None:
        """CNAME inspection (docs/design.md §2): the rule that blocks any of the names an upstream
        answer leads to (owners, CNAME and DNAME targets; lower-cased wire form)."""
        match = self.matcher.match
        for name in names:
            rule = match(name)
            if rule is not None:
                return rule
        return None

    def after_chain(self, decision: Decision, rule: str | None) -> Decision:
        """The decision once the answer is known to lead to a name that `rule` covers: what
        it would have been had the client asked for that name. A managed client is blocked;
        an allowlisted device or an unmanaged client is counted as asking for a listed name."""
        if rule is None or decision.verdict == Verdict.BLOCKED:
            return decision
        client_class = decision.client_class
        if client_class is ClientClass.MANAGED:
            return self._block(rule)
        if client_class is ClientClass.ALLOWLISTED:
            return Decision(Verdict.ALLOWLISTED, client_class, rule, decision.device)
        if client_class is ClientClass.UNMANAGED:
            return Decision(Verdict.UNMANAGED, client_class, rule)
        return decision
