"""Configuration: TOML (docs/design.md §3) into validated, frozen dataclasses.

Every key has a default.

Parsing is separate from behaviour: `load_config` turns a file plus CLI overrides into a `Config`
or raises `ConfigError` with one message naming the key and the file, before anything is bound.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
import ssl
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tiktokguard.dnsname import text_to_wire
from tiktokguard.policy.clients import IPNetwork
from tiktokguard.policy.domains import ListSource, normalise_domain

_PACKAGE = Path(__file__).resolve().parent
# The lists ship inside the package (wheel); an editable install finds them at the repo's top.
BUNDLED_LISTS = next((d for d in (_PACKAGE / "blocklists", _PACKAGE.parent / "blocklists")
                      if (d / "tiktok-bytedance.txt").is_file()), _PACKAGE / "blocklists")
DEFAULT_BLOCKLIST = "blocklists/tiktok-bytedance.txt"
DEFAULT_DOH_LIST = "blocklists/doh-providers.txt"
BLOCK_MODES = ("nxdomain", "null", "refused", "redirect")
LOOPBACK = ("127.0.0.0/8", "::1/128")


class ConfigError(Exception):
    """A configuration problem; str() is the one message the CLI prints."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int
    tls_name: str = ""  # an upstream over TLS (DoT): the name its certificate must show

    def __str__(self) -> str:
        text = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"tls://{text}#{self.tls_name}" if self.tls_name else text


@dataclass(frozen=True, slots=True)
class TokenConfig:
    role: str
    sha256: str


@dataclass(frozen=True, slots=True)
class ForwardZone:
    """Names in `zones` (and below) go to `upstreams` (conditional forwarding)."""

    zones: tuple[str, ...]  # lower-case, no trailing dot
    upstreams: tuple[HostPort, ...]


# ----------------------------------------------------------------------------------------------
# Value parsers: each raises ValueError with a reason; the caller adds key and file. A `Value`
# is a parser with the words the reference (docs/reference.md) uses for its type and range.


@dataclass(frozen=True, slots=True)
class Value:
    kind: str
    parse: Callable[[Any], Any]


def parse_hostport(text: Any, default_port: int | None = None) -> HostPort:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected a string HOST:PORT")
    text = text.strip()
    host, port_text = text, None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host = text[1:close]
        rest = text[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':PORT' after ']' in {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if port_text is None:
        if default_port is None:
            raise ValueError(f"missing port in {text!r} (HOST:PORT, [IPv6]:PORT)")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid port {port_text!r} (1-65535)")
    return HostPort(host, int(port_text))


def parse_network(text: Any) -> IPNetwork:
    if not isinstance(text, str):
        raise ValueError("expected a string IP or CIDR")
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR") from None


HOSTPORT = Value("address IP:PORT or [IPv6]:PORT", parse_hostport)
def parse_upstream(value: Any) -> HostPort:
    """IP[:PORT] (plain DNS, port 53), or tls://IP[:PORT]#NAME (DNS over TLS, port 853; the
    upstream's certificate must be valid for NAME)."""
    if isinstance(value, str) and value.strip().lower().startswith("tls://"):
        address, _, name = value.strip()[6:].partition("#")
        name = name.strip().rstrip(".")
        if not name:
            raise ValueError(f"{value!r}: a TLS upstream needs #NAME, the name its certificate "
                             "is checked against")
        try:
            text_to_wire(name)
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return replace(parse_hostport(address, default_port=853), tls_name=name.lower())
    return parse_hostport(value, default_port=53)


UPSTREAM = Value("address IP, IP:PORT or [IPv6]:PORT (port 53 if none), or "
                 "tls://IP[:PORT]#NAME (DNS over TLS, port 853)", parse_upstream)
NETWORK = Value("IP or CIDR", parse_network)


def _ip_text(version: int) -> Value:
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
        if address.version != version:
            raise ValueError(f"{value!r} is not an IPv{version} address")
        return str(address)
    return Value(f"IPv{version} address", parse)


def _int_in(low: int, high: int) -> Value:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range ({low:_}..{high:_})")
        return value
    return Value(f"integer {low:_}..{high:_}", parse)


def _bool_parse(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


BOOL = Value("true or false", _bool_parse)


def _choice(options: tuple[str, ...]) -> Value:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)
    return Value(" | ".join(options), parse)


def _string_parse(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


STRING = Value("string", _string_parse)
PATH = Value("path", _string_parse)


def _list_of(item: Value) -> Value:
    def parse(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError("expected a list")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item.parse(element))
            except ValueError as exc:
                raise ValueError(f"[{index}]: {exc}") from None
        return tuple(out)
    return Value(f"list of {item.kind}", parse)


def _name_parse(value: Any) -> str:
    text = _string_parse(value)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,30}", text):
        raise ValueError(f"expected a name of letters, digits and _ (at most 31), got {text!r}")
    return text


NAME = Value("name (a letter, then letters, digits, _; at most 31)", _name_parse)


def _webhook_url(value: Any) -> str:
    text = _string_parse(value)
    if text and not re.match(r"^https?://[^\s/]+", text):
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return text


WEBHOOK_URL = Value('http:// or https:// URL, or ""', _webhook_url)


def _http_listen(value: Any) -> HostPort | None:
    if value == "":
        return None
    return parse_hostport(value)


def _zone(value: Any) -> str:
    text = _string_parse(value).strip().rstrip(".").lower()
    if not text:
        raise ValueError("the root zone is not a forward zone (it is [dns] upstreams)")
    try:
        text_to_wire(text)
    except (ValueError, UnicodeError) as exc:
        raise ValueError(f"{value!r} is not a DNS name: {exc}") from None
    return text


def _forward(value: Any) -> tuple[ForwardZone, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of { zones = [...], upstreams = [...] }")
    out = []
    seen: set[str] = set()
    for index, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) != {"zones", "upstreams"}:
            raise ValueError(f"[{index}]: expected exactly the keys zones and upstreams")
        parsed = {}
        for key, item in (("zones", Value("zone", _zone)), ("upstreams", UPSTREAM)):
            try:
                parsed[key] = _list_of(item).parse(entry[key])
            except ValueError as exc:
                raise ValueError(f"[{index}].{key}{exc}" if str(exc).startswith("[")
                                 else f"[{index}].{key}: {exc}") from None
        zones, upstreams = parsed["zones"], parsed["upstreams"]
        if not zones or not upstreams:
            raise ValueError(f"[{index}]: needs at least one zone and one upstream")
        for zone in zones:
            if zone in seen:
                raise ValueError(f"[{index}]: zone {zone!r} is forwarded twice")
            seen.add(zone)
        out.append(ForwardZone(zones, upstreams))
    return tuple(out)


FORWARD = Value('list of { zones = ["name", ...], upstreams = ["IP[:PORT]", ...] }', _forward)
def _list_entry(value: Any) -> str:
    text = _string_parse(value).strip()
    if not text:
        raise ValueError("an empty list entry")
    if re.match(r"^[a-z][a-z0-9+.-]*://", text, re.I):
        _list_url(text)
    return text


def _list_url(text: str) -> None:
    """https:// anywhere; http:// only from a loopback address (a local mirror), since anyone
    on the path could rewrite a list fetched in the clear."""
    match = re.match(r"^(https?)://(\[[^\]]+\]|[^/:?#]+)(:\d+)?(/[^\s]*)?$", text, re.I)
    if match is None:
        raise ValueError(f"{text!r} is not an http(s) URL")
    if match.group(1).lower() == "http":
        host = match.group(2).strip("[]")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host.lower() == "localhost"
        if not loopback:
            raise ValueError(f"{text!r}: lists are fetched over https:// (http:// only from "
                             "a loopback address)")


LIST = Value("path or https:// URL", _list_entry)


def _duration(value: Any) -> int:
    text = _string_parse(value).strip()
    match = re.fullmatch(r"(\d+)\s*(s|m|h|d)", text)
    if match is None:
        raise ValueError(f"expected a duration such as \"30m\", \"6h\" or \"1d\", got {text!r}")
    seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86_400}[match.group(2)]
    if not 60 <= seconds <= 30 * 86_400:
        raise ValueError(f"{text} is out of range (1m..30d)")
    return seconds


DURATION = Value('duration "1m".."30d" (s, m, h, d)', _duration)


def _domain(value: Any) -> str:
    try:
        return normalise_domain(_string_parse(value))
    except ValueError as exc:
        raise ValueError(str(exc)) from None


DOMAIN = Value("domain name", _domain)
HTTP_LISTEN = Value('address IP:PORT or [IPv6]:PORT, or "" (off)', _http_listen)
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def _tokens(value: Any) -> dict[str, TokenConfig]:
    if not isinstance(value, dict):
        raise ValueError("expected a table of tokens")
    out = {}
    for name, spec in value.items():
        if not _TOKEN_NAME.match(name):
            raise ValueError(f".{name}: token names are 1-64 letters, digits or _.@-")
        if not isinstance(spec, dict) or set(spec) != {"role", "sha256"}:
            raise ValueError(f".{name}: expected exactly the keys role and sha256")
        if spec["role"] not in ("admin", "viewer"):
            raise ValueError(f".{name}.role: expected admin or viewer, got {spec['role']!r}")
        digest = spec["sha256"]
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ValueError(f".{name}.sha256: expected 64 hex digits")
        if len(set(digest.lower())) <= 2:
            raise ValueError(f".{name}.sha256: {digest[:8]}... is a placeholder, not the hash "
                             "of a token (printf '%s' \"$token\" | sha256sum)")
        out[name] = TokenConfig(spec["role"], digest.lower())
    return out


TOKENS = Value("table NAME = { role = \"admin\" | \"viewer\", sha256 = \"64 hex digits\" }",
               _tokens)


# ----------------------------------------------------------------------------------------------
# The keys. Each is declared once, here: its default, how it is read (Value), the line that
# documents it, and whether a reload applies it (reload=False: bound at start, changed by a
# restart). The loader, the reload's list of restart-only keys and docs/reference.md all come
# from these declarations.


def setting(default: Any, value: Value, doc: str, *, reload: bool = True,
            shown: str | None = None) -> Any:
    """A config key's declaration (a dataclass field). `shown` is the default as the reference
    prints it (Markdown), where the field's default is not what the loader fills in."""
    metadata = {"value": value, "doc": doc, "reload": reload, "shown": shown}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_LOOPBACK_NETS = tuple(ipaddress.ip_network(n) for n in LOOPBACK)


@dataclass(frozen=True, slots=True)
class DnsConfig:
    listen: tuple[HostPort, ...] = setting(
        (HostPort("127.0.0.1", 5353),), _list_of(HOSTPORT),
        "Addresses to answer on, UDP and TCP on each.", reload=False)
    upstreams: tuple[HostPort, ...] = setting(
        (), _list_of(UPSTREAM),
        "Upstream resolvers, tried in order of health; empty: the nameservers of "
        "/etc/resolv.conf.", shown="the nameservers of /etc/resolv.conf")
    upstream_timeout_ms: int = setting(
        1500, _int_in(10, 60_000),
        "How long one upstream may take before it counts as failed (the next is asked sooner: "
        "after 3 x its smoothed round-trip time, 50 ms at least).")
    forward: tuple[ForwardZone, ...] = setting(
        (), FORWARD,
        "Conditional forwarding: names in these zones (and below; the most specific zone wins, "
        "reverse zones too) go to their own upstreams. The policy still decides first.",
        shown="`[]`")
    allow_clients: tuple[IPNetwork, ...] = setting(
        _LOOPBACK_NETS, _list_of(NETWORK),
        "Clients we answer at all; anyone else gets REFUSED (no open resolver).")
    cache_size: int = setting(
        100_000, _int_in(0, 10_000_000),
        "Most answers kept in the cache (least recently used go first).")
    cache_max_bytes: int = setting(
        128 * 1024 * 1024, _int_in(1024 * 1024, 64 * 1024 ** 3),
        "Memory the cached answers may take at most (a 64 KiB TCP answer counts as such).")
    max_ttl: int = setting(
        86_400, _int_in(1, 7 * 86_400),
        "No answer is cached, nor handed to clients, with a TTL above this (seconds).")
    max_negative_ttl: int = setting(
        3_600, _int_in(0, 86_400),
        "Negative answers (NXDOMAIN, NODATA) are cached this long at most, and clients see "
        "them so: their SOA's TTL, and its MINIMUM unless signed, capped to it (RFC 2308 §5).")
    tcp_idle_timeout_ms: int = setting(
        10_000, _int_in(100, 600_000),
        "A TCP connection with no complete query or answer for this long is closed "
        "(RFC 7766 §6.2.3).")
    max_tcp_connections: int = setting(
        1000, _int_in(1, 1_000_000),
        "Open TCP and DoT connections at most, over all listeners; a newcomer sheds the "
        "longest idle.")
    max_tcp_per_client: int = setting(
        64, _int_in(1, 1_000_000),
        "Open TCP and DoT connections per client prefix (tcp_client_prefix_v4/_v6) at "
        "most; more are closed at accept (a relay that speaks for a whole segment may need "
        "more).")
    tcp_client_prefix_v4: int = setting(
        32, _int_in(8, 32),
        "The IPv4 prefix length that max_tcp_per_client counts per: 32 is per address.")
    tcp_client_prefix_v6: int = setting(
        64, _int_in(16, 128),
        "The IPv6 prefix length that max_tcp_per_client counts per: 64, since one host "
        "commonly has a /64 to pick addresses from.")
    workers: int = setting(
        1, _int_in(1, 64),
        "Processes answering DNS on the same ports (SO_REUSEPORT); more use more cores.",
        reload=False)
    rate_limit_qps: int = setting(
        0, _int_in(0, 10_000_000),
        "UDP queries a second per client address (IPv6: per /56); 0 turns the limit off.")
    rate_limit_burst: int = setting(
        0, _int_in(0, 10_000_000),
        "Queries a client may send at once above the rate; 0 means twice rate_limit_qps.")
    tls_listen: tuple[HostPort, ...] = setting(
        (), _list_of(HOSTPORT), "DNS over TLS (RFC 7858) on these addresses, e.g. "
        "[\"0.0.0.0:853\"]; needs tls_certificate and tls_private_key.", reload=False)
    https_listen: tuple[HostPort, ...] = setting(
        (), _list_of(HOSTPORT), "DNS over HTTPS (RFC 8484, path /dns-query, HTTP/1.1) on these "
        "addresses, e.g. [\"0.0.0.0:443\"].", reload=False)
    tls_handshake_timeout_ms: int = setting(
        10_000, _int_in(100, 120_000),
        "A DoT connection that has not finished its TLS handshake this long after it was "
        "accepted is closed.", reload=False)
    tls_certificate: str = setting(
        "", PATH, "PEM certificate chain of the encrypted listeners (re-read on SIGHUP).")
    tls_private_key: str = setting(
        "", PATH, "PEM private key of that certificate (re-read on SIGHUP).")
    upstream_tls_ca: str = setting(
        "", PATH, "PEM certificate authorities that TLS upstreams' certificates are checked "
        "against (empty: the system's).")
    tls_name: str = setting(
        "", STRING, "The name the certificate is for, e.g. \"dns.campus.example\": what "
        "Discovery of Designated Resolvers (RFC 9462) tells clients to connect to.")
    serve_stale: bool = setting(
        True, BOOL,
        "While every upstream fails, serve expired answers (up to a day past expiry) with TTL "
        "30 s and EDE 3 (RFC 8767).")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    managed_networks: tuple[IPNetwork, ...] = setting(
        _LOOPBACK_NETS, _list_of(NETWORK),
        "University-managed devices live here: the policy applies to them.")
    blocklists: tuple[ListSource, ...] = setting(
        (), _list_of(LIST),
        "Lists (domains, hosts lines, ||name^ and @@||name^ lines): files, relative paths from "
        "the config's folder and then the bundled lists, or https:// URLs (fetched, refreshed, "
        "the last good copy kept in the state folder).", shown=f'`["{DEFAULT_BLOCKLIST}"]`')
    blocklist_refresh: int = setting(
        86_400, DURATION,
        "How often URL lists are fetched again (a conditional GET: unchanged lists cost a 304).",
        shown='`"24h"`')
    exceptions: tuple[str, ...] = setting(
        (), _list_of(DOMAIN),
        "Names allowed even below a blocked suffix, with the names below them (the most "
        "specific entry wins): a false positive of a list.")
    block_mode: str = setting(
        "nxdomain", _choice(BLOCK_MODES),
        "How a blocked name is answered: nxdomain | null | refused | redirect.")
    block_ttl: int = setting(
        300, _int_in(0, 604_800),
        "TTL of block answers and of their synthetic SOA (how long clients cache them).")
    bypass_countermeasures: bool = setting(
        True, BOOL,
        "Answer the DoH canary, iCloud Private Relay and resolver.arpa so managed clients stay.")
    block_public_doh: bool = setting(
        False, BOOL,
        "Answer NXDOMAIN to managed clients for public DoH/DoT resolvers' names (doh_lists).")
    doh_lists: tuple[ListSource, ...] = setting(
        (), _list_of(LIST), "Lists of public encrypted-DNS names (files or URLs, as blocklists).",
        shown=f'`["{DEFAULT_DOH_LIST}"]`')
    edns_mac_trusted_relays: tuple[IPNetwork, ...] = setting(
        (), _list_of(NETWORK), "Relays whose EDNS0 MAC option (65001) is believed.")
    redirect_ipv4: str | None = setting(
        None, _ip_text(4), 'A answer for block_mode = "redirect" (e.g. a page explaining the '
        'policy).', shown="none")
    redirect_ipv6: str | None = setting(
        None, _ip_text(6), 'AAAA answer for block_mode = "redirect".', shown="none")
    neighbour_table: bool = setting(
        True, BOOL,
        "Learn client MACs from the kernel neighbour table (resolver on the clients' L2 "
        "segment).", reload=False)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: HostPort | None = setting(
        HostPort("127.0.0.1", 8053), HTTP_LISTEN,
        'The HTTP API, health and metrics listener; "" turns it off.', reload=False)
    tokens: dict[str, TokenConfig] = setting(
        {}, TOKENS, "API tokens by name: role admin or viewer, and the SHA-256 of the token.")
    metrics_token: bool = setting(
        False, BOOL, "Require a viewer (or admin) token for GET /metrics.")


@dataclass(frozen=True, slots=True)
class IncidentsConfig:
    window_seconds: int = setting(
        600, _int_in(1, 86_400 * 7), "One incident per (client, rule) per window.")
    webhook_url: str = setting(
        "", WEBHOOK_URL, "Optional: POST each new incident as JSON.")
    retention_days: int = setting(
        90, _int_in(1, 3650), "Stored incidents older than this are deleted.")
    max_rows: int = setting(
        100_000, _int_in(100, 100_000_000),
        "At most this many incidents are kept (newest first).")
    max_open: int = setting(
        100_000, _int_in(10, 10_000_000),
        "Open incidents held in memory at most; past it, one incident_storm event a window.")


@dataclass(frozen=True, slots=True)
class NetfilterConfig:
    backend: str = setting(
        "off", _choice(("off", "nftables", "ipset")),
        "Kernel sets for addresses of blocked names (needs CAP_NET_ADMIN).", reload=False)
    table: str = setting(
        "tiktokguard", NAME, "nftables: the `inet` table that holds the sets.", reload=False)
    set_v4: str = setting(
        "tiktok_v4", NAME, "Set of IPv4 addresses of blocked names.", reload=False)
    set_v6: str = setting(
        "tiktok_v6", NAME, "Set of IPv6 addresses of blocked names.", reload=False)
    exempt_v4: str = setting(
        "exempt_v4", NAME, "Set of the allowlisted devices' IPv4 addresses and networks (kept in "
        "sync with the store).", reload=False)
    exempt_v6: str = setting(
        "exempt_v6", NAME, "Set of the allowlisted devices' IPv6 addresses and networks.",
        reload=False)
    exempt_mac: str = setting(
        "exempt_mac", NAME, "Set of the allowlisted devices' MAC addresses.", reload=False)
    default_timeout: int = setting(
        3600, _int_in(1, 86_400 * 7), "Timeout of the sets themselves (elements carry their "
        "own), seconds.")
    min_timeout: int = setting(
        60, _int_in(1, 86_400), "An element lives at least this long, whatever the answer's "
        "TTL (seconds).")
    max_timeout: int = setting(
        86400, _int_in(1, 86_400 * 7), "...and at most this long (seconds).")
    shadow_resolution: bool = setting(
        True, BOOL,
        "When a managed client is blocked, resolve the name upstream to learn its addresses.")
    shadow_per_second: int = setting(
        20, _int_in(1, 10_000),
        "Shadow queries per second at most (each name at most once per min_timeout).")


@dataclass(frozen=True, slots=True)
class StateConfig:
    dir: Path = setting(
        Path("tiktokguard-state"), PATH,
        "Where the SQLite state and the generated admin token live; relative paths from the "
        "config's folder (embedded default: the working directory).", reload=False)


DSN_KEYS = {"host": "host", "port": "port", "dbname": "database", "user": "user",
            "sslmode": "ssl", "sslrootcert": "ssl", "application_name": "server_settings"}
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def dsn_arguments(text: str) -> dict[str, Any]:
    """asyncpg's connect() arguments for a libpq DSN: a postgresql:// URI as it is, or
    key=value pairs (host, port, dbname, user, sslmode, sslrootcert, application_name).
    sslrootcert is the server's CA, as in libpq; without it, verify-ca and verify-full look in
    $PGSSLROOTCERT, then ~/.postgresql/root.crt (which a service with no home does not have).
    ValueError."""
    if re.match(r"^postgres(ql)?://", text):
        if re.match(r"^postgres(ql)?://[^/@]*:[^/@]*@", text):
            raise ValueError("the DSN must not hold the password: use password_file or "
                             "$TIKTOKGUARD_DB_PASSWORD")
        return {"dsn": text}
    out: dict[str, Any] = {}
    for match in re.finditer(r"\s*(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", text):
        key, value = match.group(1), match.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if key == "password":
            raise ValueError("the DSN must not hold the password: use password_file or "
                             "$TIKTOKGUARD_DB_PASSWORD")
        if key not in DSN_KEYS:
            raise ValueError(f"unknown DSN key {key!r} (known: {', '.join(DSN_KEYS)})")
        if key == "port":
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise ValueError(f"invalid port {value!r}")
            out["port"] = int(value)
        elif key == "sslmode":
            if value not in SSL_MODES:
                raise ValueError(f"sslmode: expected one of {', '.join(SSL_MODES)}")
            out["ssl"] = value
        elif key == "sslrootcert":
            out["sslrootcert"] = value
        elif key == "application_name":
            out["server_settings"] = {"application_name": value}
        else:
            out[DSN_KEYS[key]] = value
    if re.sub(r"\s*(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "", text).strip():
        raise ValueError(f"{text!r} is not a DSN (key=value pairs, or a postgresql:// URI)")
    if "sslrootcert" in out:
        out["ssl"] = _server_ca_context(out.pop("sslrootcert"), out.get("ssl"))
    return out


def _server_ca_context(cafile: str, mode: str | None) -> ssl.SSLContext:
    """The TLS context that checks the database server against cafile: its certificate must
    chain to it, and with verify-full also name the host (libpq's sslrootcert)."""
    if mode not in ("verify-ca", "verify-full"):
        raise ValueError("sslrootcert needs sslmode=verify-full (or verify-ca): otherwise the "
                         "server's certificate would not be checked against it")
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"sslrootcert {cafile}: {exc.strerror or exc}") from None
    context.check_hostname = mode == "verify-full"
    return context


def _dsn(value: Any) -> str:
    text = _string_parse(value).strip()
    dsn_arguments(text)
    return text


DSN = Value("libpq DSN (key=value or postgresql://), without the password", _dsn)


def _instance(value: Any) -> str:
    text = _string_parse(value).strip()
    if len(text) > 64 or not re.fullmatch(r"[A-Za-z0-9_.:-]*", text):
        raise ValueError("expected at most 64 letters, digits or _.:-")
    return text


INSTANCE = Value("name (letters, digits, _.:-; at most 64)", _instance)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    backend: str = setting(
        "sqlite", _choice(("sqlite", "postgres")),
        "Where devices, audit trail, tokens and incidents live: sqlite (this machine, in "
        "state.dir) or postgres (shared by every resolver that names the same database).",
        reload=False)
    dsn: str = setting(
        "", DSN, "postgres: the database, e.g. \"host=db.campus.example dbname=tiktokguard "
        "user=tiktokguard\" (never the password).", reload=False)
    password_file: str = setting(
        "", STRING, "postgres: a file holding the password (else $TIKTOKGUARD_DB_PASSWORD, else "
        "none: peer or certificate authentication).", reload=False)
    instance: str = setting(
        "", INSTANCE, "This resolver's name in audit entries and incidents.", reload=False,
        shown="the host name")


@dataclass(frozen=True, slots=True)
class Config:
    dns: DnsConfig = DnsConfig()
    policy: PolicyConfig = PolicyConfig()
    http: HttpConfig = HttpConfig()
    incidents: IncidentsConfig = IncidentsConfig()
    netfilter: NetfilterConfig = NetfilterConfig()
    state: StateConfig = StateConfig()
    store: StoreConfig = StoreConfig()
    source: str = "<embedded default>"


@dataclass(frozen=True, slots=True)
class Key:
    """One config key as the reference shows it."""

    section: str
    name: str
    kind: str
    default: str
    doc: str
    reload: bool

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"


def _shown(value: Any) -> str:
    """A default as TOML would spell it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:_}" if value >= 10_000 else str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}"
    if value is None:
        return "none"
    return f'"{value}"'


# The sections, in file order: each field of Config but `source` (its default is the section's).
SECTIONS: dict[str, type] = {f.name: type(f.default) for f in fields(Config)
                             if f.name != "source"}


def declarations() -> list[Key]:
    """Every config key, in file order: what the loader reads and the reference documents."""
    keys = []
    for section, cls in SECTIONS.items():
        defaults = cls()
        for f in fields(cls):
            meta = f.metadata
            shown = meta["shown"] or f"`{_shown(getattr(defaults, f.name))}`"
            keys.append(Key(section, f.name, meta["value"].kind, shown, meta["doc"],
                            meta["reload"]))
    return keys


# Settings bound at start: a reload that changes them says so, and they change on restart.
RESTART_KEYS = tuple(key.path for key in declarations() if not key.reload)


def setting_of(config: Config, path: str) -> object:
    section, name = path.split(".")
    return getattr(getattr(config, section), name)


def _section(name: str, raw: Any, source: str) -> dict[str, Any]:
    parsers = {f.name: f.metadata["value"].parse for f in fields(SECTIONS[name])}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        parser = parsers.get(key)
        if parser is None:
            known = ", ".join(parsers)
            raise ConfigError(f"{source}: unknown key [{name}] {key} (known: {known})")
        try:
            values[key] = parser(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: [{name}] {key}: {exc}") from None
    return values


def _netfilter(values: dict[str, Any], source: str) -> NetfilterConfig:
    config = NetfilterConfig(**values)
    if config.min_timeout > config.max_timeout:
        raise ConfigError(f"{source}: [netfilter] min_timeout: {config.min_timeout} is more than "
                          f"max_timeout {config.max_timeout}")
    names = ("set_v4", "set_v6", "exempt_v4", "exempt_v6", "exempt_mac")
    seen: dict[str, str] = {}
    for key in names:
        value = getattr(config, key)
        if value in seen:
            raise ConfigError(f"{source}: [netfilter] {key}: must differ from {seen[value]}")
        seen[value] = key
    return config


def resolve_list_path(entry: str, base: Path) -> Path | None:
    """A list path as written in config: relative to the config's folder, else a bundled list."""
    path = Path(entry).expanduser()
    if path.is_absolute():
        return path if path.is_file() else None
    candidates = [base / path]
    if path.parts and path.parts[0] == "blocklists":
        candidates.append(BUNDLED_LISTS.joinpath(*path.parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    return None


def _encrypted(dns: DnsConfig, source: str, base: Path) -> DnsConfig:
    """The TLS files as absolute paths, checked by loading them: a bad certificate must stop the
    start, naming the key, not fail at the first handshake."""
    def absolute(text: str) -> str:
        path = Path(text).expanduser()
        return str(path if path.is_absolute() else base / path) if text else ""
    dns = replace(dns, tls_certificate=absolute(dns.tls_certificate),
                  tls_private_key=absolute(dns.tls_private_key),
                  upstream_tls_ca=absolute(dns.upstream_tls_ca))
    if dns.upstream_tls_ca and not Path(dns.upstream_tls_ca).is_file():
        raise ConfigError(f"{source}: [dns] upstream_tls_ca: {dns.upstream_tls_ca}: no such file")
    if not dns.tls_listen and not dns.https_listen:
        return dns
    for key in ("tls_certificate", "tls_private_key", "tls_name"):
        if not getattr(dns, key):
            raise ConfigError(f"{source}: [dns] {key}: the encrypted listeners (tls_listen, "
                              "https_listen) need it")
    try:  # (as dns/tls.py loads them; config imports nothing of the dns package)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(dns.tls_certificate,
                                                                dns.tls_private_key)
    except ssl.SSLError as exc:  # (before OSError, of which it is one)
        raise ConfigError(f"{source}: [dns] tls_certificate: {dns.tls_certificate} with "
                          f"{dns.tls_private_key}: not a usable certificate and key "
                          f"({exc.reason or exc})") from None
    except OSError as exc:
        raise ConfigError(f"{source}: [dns] tls_certificate/tls_private_key: "
                          f"{exc.filename or dns.tls_certificate}: {exc.strerror}") from None
    return dns


def _store(values: dict[str, Any], source: str, base: Path) -> StoreConfig:
    store = StoreConfig(**values)
    if store.backend == "postgres" and not store.dsn:
        raise ConfigError(f"{source}: [store] dsn: backend = \"postgres\" needs a dsn")
    if store.password_file:
        path = Path(store.password_file).expanduser()
        store = replace(store, password_file=str(path if path.is_absolute() else base / path))
    if not store.instance:
        store = replace(store, instance=socket.gethostname()[:64])
    return store


def url_list(url: str, state_dir: Path) -> ListSource:
    """A URL list: read from its last good copy in the state folder (fetched by the daemon)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return ListSource(url, state_dir / "lists" / f"{digest}.txt", "remote", url)


def resolv_conf_upstreams(path: Path = Path("/etc/resolv.conf")) -> tuple[HostPort, ...]:
    """The nameservers of resolv.conf, the embedded default's upstreams."""
    out = []
    try:
        text = path.read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        fields_ = line.split()
        if len(fields_) >= 2 and fields_[0] == "nameserver":
            try:
                out.append(parse_hostport(fields_[1].split("%", 1)[0], default_port=53))
            except ValueError:
                continue
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Overrides:
    """CLI flags; None or empty means "as in the file"."""

    dns_listen: tuple[str, ...] = ()
    http_listen: str | None = None
    upstreams: tuple[str, ...] = ()
    state_dir: str | None = None


def load_config(path: str | Path | None = None, overrides: Overrides | None = None,
                resolv_conf: Path = Path("/etc/resolv.conf")) -> Config:
    """Read, validate and complete the configuration. Raises ConfigError."""
    overrides = overrides or Overrides()
    raw: dict[str, Any] = {}
    source = "<embedded default>"
    base = Path.cwd()
    if path is not None:
        source = str(path)
        base = Path(path).resolve().parent
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
    sections = {name: _section(name, raw.get(name, {}), source) for name in SECTIONS}

    def flag(name: str, parse: Callable[[], Any]) -> Any:
        try:
            return parse()
        except ValueError as exc:
            raise ConfigError(f"command line: {name}: {exc}") from None

    if overrides.dns_listen:
        sections["dns"]["listen"] = flag(
            "--dns-listen", lambda: tuple(parse_hostport(v) for v in overrides.dns_listen))
    if overrides.upstreams:
        sections["dns"]["upstreams"] = flag(
            "--upstream", lambda: tuple(parse_upstream(v) for v in overrides.upstreams))
    if overrides.http_listen is not None:
        sections["http"]["listen"] = flag("--http-listen",
                                          lambda: _http_listen(overrides.http_listen))
    if overrides.state_dir is not None:
        sections["state"]["dir"] = overrides.state_dir

    dns = DnsConfig(**sections["dns"])
    if not dns.listen:
        raise ConfigError(f"{source}: [dns] listen: at least one address is needed")
    seen_listen: dict[tuple[str, int], int] = {}
    for index, hostport in enumerate(dns.listen):
        bound = (str(ipaddress.ip_address(hostport.host)), hostport.port)
        if bound in seen_listen:
            raise ConfigError(f"{source}: [dns] listen[{index}]: {hostport} is listen"
                              f"[{seen_listen[bound]}] again")
        seen_listen[bound] = index
    if not dns.upstreams:
        dns = replace(dns, upstreams=resolv_conf_upstreams(resolv_conf))
        if not dns.upstreams:
            raise ConfigError(f"{source}: [dns] upstreams: none configured and none found in "
                              f"{resolv_conf}")
    dns = _encrypted(dns, source, base)
    own = {(hp.host, hp.port) for hp in dns.listen + dns.tls_listen + dns.https_listen}
    for index, upstream in enumerate(dns.upstreams):
        if (upstream.host, upstream.port) in own:
            raise ConfigError(f"{source}: [dns] upstreams[{index}]: {upstream} is one of our own "
                              "listen addresses (a forwarding loop)")
    for index, zone in enumerate(dns.forward):
        for upstream in zone.upstreams:
            if (upstream.host, upstream.port) in own:
                raise ConfigError(f"{source}: [dns] forward[{index}]: {upstream} is one of our "
                                  "own listen addresses (a forwarding loop)")

    state_dir = Path(sections["state"].get("dir", "tiktokguard-state")).expanduser()
    if not state_dir.is_absolute():
        state_dir = base / state_dir if path is not None else Path.cwd() / state_dir

    policy_values = sections["policy"]
    for key, default in (("blocklists", DEFAULT_BLOCKLIST), ("doh_lists", DEFAULT_DOH_LIST)):
        lists = []
        for index, entry in enumerate(policy_values.pop(key, (default,))):
            if "://" in entry:
                lists.append(url_list(entry, state_dir))
                continue
            found = resolve_list_path(entry, base)
            if found is None:
                raise ConfigError(f"{source}: [policy] {key}[{index}]: list file not found: "
                                  f"{entry!r} (looked in {base} and the bundled lists)")
            bundled = found.is_relative_to(BUNDLED_LISTS.resolve())
            lists.append(ListSource(str(found), found, "strict" if bundled else "local"))
        policy_values[key] = tuple(lists)
    policy = PolicyConfig(**policy_values)
    for index, network in enumerate(policy.managed_networks):
        if not any(network.version == served.version and network.subnet_of(served)  # type: ignore[arg-type]
                   for served in dns.allow_clients):
            raise ConfigError(
                f"{source}: [policy] managed_networks[{index}]: {network} is not inside [dns] "
                f"allow_clients ({', '.join(str(n) for n in dns.allow_clients)}): its clients "
                "would be refused, not filtered; add it to allow_clients")
    if policy.block_mode == "redirect" and not (policy.redirect_ipv4 or policy.redirect_ipv6):
        raise ConfigError(f"{source}: [policy] block_mode: \"redirect\" needs redirect_ipv4 "
                          "and/or redirect_ipv6")
    return Config(
        dns=dns,
        policy=policy,
        http=HttpConfig(**sections["http"]),
        incidents=IncidentsConfig(**sections["incidents"]),
        netfilter=_netfilter(sections["netfilter"], source),
        state=StateConfig(dir=state_dir),
        store=_store(sections["store"], source, base),
        source=source,
    )
