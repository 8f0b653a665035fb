"""Domain lists: parse list files and match query names against them by suffix.

A list entry `tiktok.com` blocks `tiktok.com` and every name below it (DESIGN §2). Matching works
on the lower-cased wire form of the query name, so a look-up costs one dict probe per label and
no decoding; names keep their punycode form exactly as they travel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tiktokguard.dnsname import text_to_wire


class ListError(Exception):
    """A list file that cannot be used; the message names the file and line."""


_HOSTS_ADDRESSES = {"0.0.0.0", "127.0.0.1", "::", "::1", "0:0:0:0:0:0:0:0"}
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$|^\*$")
_ADBLOCK = re.compile(r"^\|\|([^\^/$|]+)\^(\$.*)?$")


def parse_line(line: str) -> str | None:
    """The domain a list line names, or None for a blank or comment line.

    Accepts `name`, hosts-file lines (`0.0.0.0 name [name...]` take the first name) and
    adblock-style `||name^`. Raises ValueError with a reason for anything else.
    """
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("!"):  # "!" starts an adblock comment
        return None
    match = _ADBLOCK.match(text)
    if match:
        if match.group(2):
            raise ValueError("adblock rules with $modifiers are not supported")
        text = match.group(1)
    else:
        fields = text.split()
        if len(fields) > 1:
            if fields[0] not in _HOSTS_ADDRESSES:
                raise ValueError(f"hosts line must start with a null address, not {fields[0]!r}")
            if len(fields) > 2:
                raise ValueError("hosts line with more than one name")
            text = fields[1]
    return normalise_domain(text)


def normalise_domain(text: str) -> str:
    """Lower-case, no trailing dot, IDN to punycode; ValueError when it is not a domain name."""
    name = text.strip().rstrip(".").lower()
    if name.startswith("*."):
        name = name[2:]  # "*.example.com" means the same as "example.com" for a suffix list
    if not name:
        raise ValueError("empty domain")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"invalid internationalised name {text!r}: {exc}") from None
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label) or label == "*":
            raise ValueError(f"invalid domain name {text!r}")
    if len(name) > 253:
        raise ValueError(f"domain name longer than 253 characters: {text[:40]!r}...")
    return name


def parse_list(text: str, source: str) -> list[str]:
    """All domains of one list file's text; ListError names file and line of the first bad one."""
    domains = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            domain = parse_line(line)
        except ValueError as exc:
            raise ListError(f"{source}:{number}: {exc}: {line.strip()[:80]!r}") from None
        if domain is not None:
            domains.append(domain)
    return domains


def load_lists(paths: tuple[Path, ...] | list[Path]) -> DomainMatcher:
    """Read every list file into one matcher; ListError if any file is missing or bad."""
    rules: dict[bytes, str] = {}
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ListError(f"{path}: cannot read list: {exc}") from None
        for domain in parse_list(text, str(path)):
            rules.setdefault(text_to_wire(domain), domain)
    return DomainMatcher(rules)


@dataclass(frozen=True, slots=True)
class DomainMatcher:
    """Suffix matcher over wire-form names; immutable, so a reload swaps it in one assignment."""

    rules: dict[bytes, str]  # wire form → the list entry as text (the metric's `rule` label)

    @classmethod
    def from_domains(cls, domains: list[str] | tuple[str, ...]) -> DomainMatcher:
        return cls({text_to_wire(normalise_domain(d)): normalise_domain(d) for d in domains})

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, qname: bytes) -> str | None:
        """The rule that covers qname (lower-cased wire form), longest suffix first, or None.

        Walks the label boundaries: O(labels) dict probes."""
        rules = self.rules
        if not rules:
            return None
        pos = 0
        end = len(qname) - 1
        while pos < end:
            rule = rules.get(qname[pos:] if pos else qname)
            if rule is not None:
                return rule
            pos += qname[pos] + 1
        return None

    def match_text(self, name: str) -> str | None:
        """match() for a name in presentation form (CLI, API)."""
        try:
            wire = text_to_wire(name)
        except (ValueError, UnicodeError):
            return None
        return self.match(wire)


__all__ = ["DomainMatcher", "ListError", "load_lists", "parse_line", "parse_list"]
