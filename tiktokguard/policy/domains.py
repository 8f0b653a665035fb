"""Domain lists: parse list files and match query names against them by suffix.

A list entry `tiktok.com` blocks `tiktok.com` and every name below it (docs/design.md §2).
An exception (`@@||cdn.tiktok.com^` in a list, or `policy.exceptions`) allows a name and those
below it even under a blocked suffix: the most specific entry wins. Matching works on the
lower-cased wire form of the query name, so a look-up costs one dict probe per label and no
decoding; names keep their punycode form exactly as they travel.

How strictly a list is read depends on where it comes from (`ListSource.mode`):
- "strict", the bundled curated lists: every line must be a plain entry.
- "local", the admin's own files: third-party syntax that tiktokguard does not use (adblock
  `$modifiers`) is skipped and counted; a line that is not list syntax at all is an error that
  names file and line (a typo must not pass silently).
- "remote", lists fetched from URLs: anything that does not parse is skipped and counted (the
  admin cannot fix someone else's list; one bad line must not cost the other rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tiktokguard.dnsname import text_to_wire


class ListError(Exception):
    """A list file that cannot be used; the message names the file and line."""


class Unsupported(ValueError):
    """List syntax tiktokguard knows but does not use (adblock rules with $modifiers)."""


MODES = ("strict", "local", "remote")
SKIPPED_EXAMPLES = 3  # lines kept per list to show what was skipped


@dataclass(frozen=True, slots=True)
class ListSource:
    """One list: its name as configured (a path or a URL), the file to read, how strictly."""

    name: str
    path: Path
    mode: str = "local"
    url: str = ""  # a URL list: `path` is its last good copy


_HOSTS_ADDRESSES = {"0.0.0.0", "127.0.0.1", "::", "::1", "0:0:0:0:0:0:0:0"}
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$|^\*$")
_ADBLOCK = re.compile(r"^(@@)?\|\|([^\^/$|]+)\^(\$.*)?$")
_HEADER = re.compile(r"^\[[^\]]*\]$")  # "[Adblock Plus 2.0]"


def parse_line(line: str) -> str | None:
    """The domain a blocking line names, or None for a blank or comment line.

    Accepts `name`, hosts-file lines (`0.0.0.0 name`) and adblock-style `||name^`. Raises
    ValueError with a reason for anything else (exceptions included: see read_line)."""
    entry = read_line(line)
    if entry is None:
        return None
    domain, allow = entry
    if allow:
        raise Unsupported("an exception (@@) where only blocking entries belong")
    return domain


def read_line(line: str) -> tuple[str, bool] | None:
    """(domain, is an exception) for a list line, or None for a blank, comment or header line.

    Accepts `name`, hosts-file lines (`0.0.0.0 name`), adblock-style `||name^` and exceptions
    `@@||name^`; `!` comments and `[Adblock ...]` headers are skipped. Raises Unsupported for
    adblock rules with `$modifiers`, ValueError with a reason for anything else."""
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("!") or _HEADER.match(text):  # "!": an adblock comment
        return None
    allow = False
    match = _ADBLOCK.match(text)
    if match:
        if match.group(3):
            raise Unsupported("adblock rules with $modifiers are not supported")
        allow = match.group(1) is not None
        text = match.group(2)
    else:
        fields = text.split()
        if len(fields) > 1:
            if fields[0] not in _HOSTS_ADDRESSES:
                raise ValueError(f"hosts line must start with a null address, not {fields[0]!r}")
            if len(fields) > 2:
                raise ValueError("hosts line with more than one name")
            text = fields[1]
    return normalise_domain(text), allow


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


@dataclass(slots=True)
class ParsedList:
    blocks: list[str] = field(default_factory=list)
    allows: list[str] = field(default_factory=list)
    skipped: int = 0
    examples: list[str] = field(default_factory=list)  # "source:line: reason"


def parse_list(text: str, source: str, mode: str = "strict") -> ParsedList:
    """One list's entries. Lines are skipped (and counted) or refused (ListError naming file and
    line) as `mode` says (see the module's docstring)."""
    out = ParsedList()
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = read_line(line)
        except ValueError as exc:
            tolerated = mode == "remote" or (mode == "local" and isinstance(exc, Unsupported))
            where = f"{source}:{number}: {exc}: {line.strip()[:80]!r}"
            if not tolerated:
                raise ListError(where) from None
            out.skipped += 1
            if len(out.examples) < SKIPPED_EXAMPLES:
                out.examples.append(where)
            continue
        if entry is not None:
            if entry[1] and mode == "strict":
                raise ListError(f"{source}:{number}: exceptions (@@) do not belong in a curated "
                                f"list: {line.strip()[:80]!r}")
            (out.allows if entry[1] else out.blocks).append(entry[0])
    return out


def load_lists(sources: list[ListSource] | tuple[ListSource, ...] | list[Path],
               exceptions: tuple[str, ...] = ()) -> DomainMatcher:
    """Read every list into one matcher, with `exceptions` (normalised names) allowed; ListError
    if a file cannot be read or a line is refused. (Plain paths are read strictly.)"""
    rules: dict[bytes, str] = {}
    allowed: dict[bytes, str] = {}
    skipped: dict[str, int] = {}
    examples: list[str] = []
    missing: list[str] = []
    for source in sources:
        if isinstance(source, Path):
            source = ListSource(str(source), source, "strict")
        try:
            text = source.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if source.url:  # never fetched yet: not in force, said by /readyz
                missing.append(source.name)
                continue
            raise ListError(f"{source.name}: cannot read list: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ListError(f"{source.name}: cannot read list: {exc}") from None
        parsed = parse_list(text, source.name, source.mode)
        for domain in parsed.blocks:
            rules.setdefault(text_to_wire(domain), domain)
        for domain in parsed.allows:
            allowed.setdefault(text_to_wire(domain), domain)
        skipped[source.name] = parsed.skipped
        examples += parsed.examples
    for domain in exceptions:
        allowed.setdefault(text_to_wire(domain), domain)
    return DomainMatcher(rules, allowed, skipped, tuple(examples), tuple(missing))


@dataclass(frozen=True, slots=True)
class DomainMatcher:
    """Suffix matcher over wire-form names; immutable, so a reload swaps it in one assignment."""

    rules: dict[bytes, str]  # wire form → the list entry as text (the metric's `rule` label)
    exceptions: dict[bytes, str] = field(default_factory=dict)  # allowed below a blocked suffix
    skipped: dict[str, int] = field(default_factory=dict)  # lines skipped, per list
    skipped_examples: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  # URL lists with no copy yet (never fetched)
    # rules and exceptions in one dict (an exception as ""), so that a look-up finds the most
    # specific entry of either kind in one walk; the rules themselves when there are none.
    _index: dict[bytes, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = self.rules
        if self.exceptions:
            index = dict(self.rules)
            index.update(dict.fromkeys(self.exceptions, ""))
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_domains(cls, domains: list[str] | tuple[str, ...],
                     exceptions: list[str] | tuple[str, ...] = ()) -> DomainMatcher:
        return cls({text_to_wire(normalise_domain(d)): normalise_domain(d) for d in domains},
                   {text_to_wire(normalise_domain(d)): normalise_domain(d) for d in exceptions})

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, qname: bytes) -> str | None:
        """The rule that covers qname (lower-cased wire form), or None: the most specific entry
        decides, and an exception allows. Walks the label boundaries: O(labels) dict probes."""
        rules = self._index
        if not rules:
            return None
        pos = 0
        end = len(qname) - 1
        while pos < end:
            rule = rules.get(qname[pos:] if pos else qname)
            if rule is not None:
                return rule or None  # "": an exception
            pos += qname[pos] + 1
        return None

    def exception_for(self, qname: bytes) -> str | None:
        """The exception that allows qname under a blocked suffix, if one does (CLI, API)."""
        if not self.exceptions:
            return None
        pos = 0
        end = len(qname) - 1
        while pos < end:
            key = qname[pos:]
            rule = self._index.get(key)
            if rule is not None:
                return self.exceptions[key] if rule == "" else None
            pos += qname[pos] + 1
        return None

    def match_text(self, name: str) -> str | None:
        """match() for a name in presentation form (CLI, API)."""
        try:
            wire = text_to_wire(name)
        except (ValueError, UnicodeError):
            return None
        return self.match(wire)


__all__ = ["DomainMatcher", "ListError", "ListSource", "ParsedList", "Unsupported", "load_lists",
           "normalise_domain", "parse_line", "parse_list", "read_line"]
