"""Configuration: TOML (DESIGN §3) into validated, frozen dataclasses. Every key has a default.

Parsing is separate from behaviour: `load_config` turns a file plus CLI overrides into a `Config`
or raises `ConfigError` with one message naming the key and the file, before anything is bound.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tiktokguard.policy.clients import IPNetwork

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

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DnsConfig:
    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", 5353),)
    """Addresses to answer on, UDP and TCP on each."""
    upstreams: tuple[HostPort, ...] = ()
    """Upstream resolvers, tried in order of health; empty: the nameservers of /etc/resolv.conf."""
    upstream_timeout_ms: int = 1500
    """How long one upstream may take before the next is tried."""
    allow_clients: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in LOOPBACK)
    """Clients we answer at all; anyone else gets REFUSED (no open resolver)."""
    cache_size: int = 100_000
    """Most answers kept in the cache (least recently used go first)."""
    cache_max_bytes: int = 128 * 1024 * 1024
    """Memory the cached answers may take at most (a 64 KiB TCP answer counts as such)."""
    max_ttl: int = 86_400
    """No answer is cached, nor handed to clients, with a TTL above this (seconds)."""
    max_negative_ttl: int = 3_600
    """Negative answers (NXDOMAIN, NODATA) are cached this long at most (RFC 2308 §5)."""
    tcp_idle_timeout_ms: int = 10_000
    """A TCP connection with no complete query or answer for this long is closed (RFC 7766
    §6.2.3)."""
    max_tcp_connections: int = 1000
    """Open TCP connections at most, over all listeners; a newcomer sheds the longest idle."""
    max_tcp_per_client: int = 64
    """Open TCP connections per client address at most; more are closed at once (a relay that
    speaks for a whole segment may need more)."""
    workers: int = 1
    """Processes answering DNS on the same ports (SO_REUSEPORT); more use more cores."""
    rate_limit_qps: int = 0
    """UDP queries a second per client address (IPv6: per /56); 0 turns the limit off."""
    rate_limit_burst: int = 0
    """Queries a client may send at once above the rate; 0 means twice rate_limit_qps."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    managed_networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in LOOPBACK)
    """University-managed devices live here: the policy applies to them."""
    blocklists: tuple[Path, ...] = ()
    """List files (domains, hosts or ||name^ lines); relative paths from the config's folder."""
    block_mode: str = "nxdomain"
    """How a blocked name is answered: nxdomain | null | refused | redirect."""
    block_ttl: int = 300
    """TTL of block answers and of their synthetic SOA (how long clients cache them)."""
    bypass_countermeasures: bool = True
    """Answer the DoH canary, iCloud Private Relay and resolver.arpa so managed clients stay."""
    block_public_doh: bool = False
    """Answer NXDOMAIN to managed clients for public DoH/DoT resolvers' names (doh_lists)."""
    doh_lists: tuple[Path, ...] = ()
    """Lists of public encrypted-DNS names (default: the bundled doh-providers.txt)."""
    edns_mac_trusted_relays: tuple[IPNetwork, ...] = ()
    """Relays whose EDNS0 MAC option (65001) is believed."""
    redirect_ipv4: str | None = None
    """A answer for block_mode = "redirect" (e.g. a page explaining the policy)."""
    redirect_ipv6: str | None = None
    """AAAA answer for block_mode = "redirect"."""
    neighbour_table: bool = True
    """Learn client MACs from the kernel neighbour table (resolver on the clients' L2 segment)."""


@dataclass(frozen=True, slots=True)
class TokenConfig:
    role: str
    sha256: str


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: HostPort | None = HostPort("127.0.0.1", 8053)
    """The HTTP API, health and metrics listener; "" turns it off."""
    tokens: dict[str, TokenConfig] = field(default_factory=dict)
    """API tokens by name: role admin or viewer, and the SHA-256 of the token."""
    metrics_token: bool = False
    """Require a viewer (or admin) token for GET /metrics."""


@dataclass(frozen=True, slots=True)
class IncidentsConfig:
    window_seconds: int = 600
    """One incident per (client, rule) per window."""
    webhook_url: str = ""
    """Optional: POST each new incident as JSON."""
    retention_days: int = 90
    """Stored incidents older than this are deleted."""
    max_rows: int = 100_000
    """At most this many incidents are kept (newest first)."""
    max_open: int = 100_000
    """Open incidents held in memory at most; past it, one incident_storm event a window."""


@dataclass(frozen=True, slots=True)
class NetfilterConfig:
    backend: str = "off"
    """Kernel sets for addresses of blocked names: off | nftables | ipset (needs CAP_NET_ADMIN)."""
    table: str = "tiktokguard"
    """nftables: the `inet` table that holds the sets."""
    set_v4: str = "tiktok_v4"
    """Set of IPv4 addresses of blocked names."""
    set_v6: str = "tiktok_v6"
    """Set of IPv6 addresses of blocked names."""
    exempt_v4: str = "exempt_v4"
    """Set of the allowlisted devices' IPv4 addresses and networks (kept in sync with the store)."""
    exempt_v6: str = "exempt_v6"
    """...their IPv6 addresses and networks."""
    exempt_mac: str = "exempt_mac"
    """...and their MAC addresses."""
    default_timeout: int = 3600
    """Timeout of the sets themselves (elements carry their own)."""
    min_timeout: int = 60
    """An element lives at least this long, whatever the answer's TTL."""
    max_timeout: int = 86400
    """...and at most this long."""
    shadow_resolution: bool = True
    """When a managed client is blocked, resolve the name upstream to learn its addresses."""
    shadow_per_second: int = 20
    """Shadow queries per second at most (each name at most once per min_timeout)."""


@dataclass(frozen=True, slots=True)
class StateConfig:
    dir: Path = Path("tiktokguard-state")
    """Where the SQLite state and the generated admin token live."""


@dataclass(frozen=True, slots=True)
class Config:
    dns: DnsConfig = DnsConfig()
    policy: PolicyConfig = PolicyConfig()
    http: HttpConfig = HttpConfig()
    incidents: IncidentsConfig = IncidentsConfig()
    netfilter: NetfilterConfig = NetfilterConfig()
    state: StateConfig = StateConfig()
    source: str = "<embedded default>"


# ----------------------------------------------------------------------------------------------
# Value parsers: each raises ValueError with a reason; the caller adds key and file.


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


def _ip_text(version: int) -> Callable[[Any], str]:
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
    return parse


def _int_in(low: int, high: float) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range ({low}..{high:g})")
        return value
    return parse


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)
    return parse


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, ...]]:
    def parse(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError("expected a list")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except ValueError as exc:
                raise ValueError(f"[{index}]: {exc}") from None
        return tuple(out)
    return parse


def _name(value: Any) -> str:
    text = _string(value)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,30}", text):
        raise ValueError(f"expected a name of letters, digits and _ (at most 31), got {text!r}")
    return text


def _webhook_url(value: Any) -> str:
    text = _string(value)
    if text and not re.match(r"^https?://[^\s/]+", text):
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def _http_listen(value: Any) -> HostPort | None:
    if value == "":
        return None
    return parse_hostport(value)


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
        out[name] = TokenConfig(spec["role"], digest.lower())
    return out


_SECTIONS: dict[str, tuple[type, dict[str, Callable[[Any], Any]]]] = {
    "dns": (DnsConfig, {
        "listen": _list_of(parse_hostport),
        "upstreams": _list_of(lambda v: parse_hostport(v, default_port=53)),
        "upstream_timeout_ms": _int_in(10, 60_000),
        "allow_clients": _list_of(parse_network),
        "cache_size": _int_in(0, 10_000_000),
        "cache_max_bytes": _int_in(1024 * 1024, 64 * 1024 ** 3),
        "max_ttl": _int_in(1, 7 * 86_400),
        "max_negative_ttl": _int_in(0, 86_400),
        "tcp_idle_timeout_ms": _int_in(100, 600_000),
        "max_tcp_connections": _int_in(1, 1_000_000),
        "max_tcp_per_client": _int_in(1, 1_000_000),
        "rate_limit_qps": _int_in(0, 10_000_000),
        "rate_limit_burst": _int_in(0, 10_000_000),
        "workers": _int_in(1, 64),
    }),
    "policy": (PolicyConfig, {
        "managed_networks": _list_of(parse_network),
        "blocklists": _list_of(_string),
        "block_mode": _choice(BLOCK_MODES),
        "block_ttl": _int_in(0, 604_800),
        "bypass_countermeasures": _bool,
        "block_public_doh": _bool,
        "doh_lists": _list_of(_string),
        "edns_mac_trusted_relays": _list_of(parse_network),
        "redirect_ipv4": _ip_text(4),
        "redirect_ipv6": _ip_text(6),
        "neighbour_table": _bool,
    }),
    "http": (HttpConfig, {"listen": _http_listen, "tokens": _tokens, "metrics_token": _bool}),
    "incidents": (IncidentsConfig, {
        "window_seconds": _int_in(1, 86_400 * 7),
        "webhook_url": _webhook_url,
        "retention_days": _int_in(1, 3650),
        "max_rows": _int_in(100, 100_000_000),
        "max_open": _int_in(10, 10_000_000),
    }),
    "netfilter": (NetfilterConfig, {
        "backend": _choice(("off", "nftables", "ipset")),
        "table": _name,
        "set_v4": _name,
        "set_v6": _name,
        "exempt_v4": _name,
        "exempt_v6": _name,
        "exempt_mac": _name,
        "default_timeout": _int_in(1, 86_400 * 7),
        "min_timeout": _int_in(1, 86_400),
        "max_timeout": _int_in(1, 86_400 * 7),
        "shadow_resolution": _bool,
        "shadow_per_second": _int_in(1, 10_000),
    }),
    "state": (StateConfig, {"dir": _string}),
}


def _section(name: str, raw: Any, source: str) -> dict[str, Any]:
    parsers = _SECTIONS[name][1]
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
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}] (known: {', '.join(_SECTIONS)})")
    sections = {name: _section(name, raw.get(name, {}), source) for name in _SECTIONS}

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
            "--upstream", lambda: tuple(parse_hostport(v, 53) for v in overrides.upstreams))
    if overrides.http_listen is not None:
        sections["http"]["listen"] = flag("--http-listen",
                                          lambda: _http_listen(overrides.http_listen))
    if overrides.state_dir is not None:
        sections["state"]["dir"] = overrides.state_dir

    dns = DnsConfig(**sections["dns"])
    if not dns.listen:
        raise ConfigError(f"{source}: [dns] listen: at least one address is needed")
    if not dns.upstreams:
        dns = replace(dns, upstreams=resolv_conf_upstreams(resolv_conf))
        if not dns.upstreams:
            raise ConfigError(f"{source}: [dns] upstreams: none configured and none found in "
                              f"{resolv_conf}")
    own = {(hp.host, hp.port) for hp in dns.listen}
    for index, upstream in enumerate(dns.upstreams):
        if (upstream.host, upstream.port) in own:
            raise ConfigError(f"{source}: [dns] upstreams[{index}]: {upstream} is one of our own "
                              "listen addresses (a forwarding loop)")

    policy_values = sections["policy"]
    for key, default in (("blocklists", DEFAULT_BLOCKLIST), ("doh_lists", DEFAULT_DOH_LIST)):
        lists = []
        for index, entry in enumerate(policy_values.pop(key, (default,))):
            found = resolve_list_path(entry, base)
            if found is None:
                raise ConfigError(f"{source}: [policy] {key}[{index}]: list file not found: "
                                  f"{entry!r} (looked in {base} and the bundled lists)")
            lists.append(found)
        policy_values[key] = tuple(lists)
    policy = PolicyConfig(**policy_values)
    if policy.block_mode == "redirect" and not (policy.redirect_ipv4 or policy.redirect_ipv6):
        raise ConfigError(f"{source}: [policy] block_mode: \"redirect\" needs redirect_ipv4 "
                          "and/or redirect_ipv6")

    state_dir = Path(sections["state"].get("dir", "tiktokguard-state")).expanduser()
    if not state_dir.is_absolute():
        state_dir = base / state_dir if path is not None else Path.cwd() / state_dir
    return Config(
        dns=dns,
        policy=policy,
        http=HttpConfig(**sections["http"]),
        incidents=IncidentsConfig(**sections["incidents"]),
        netfilter=_netfilter(sections["netfilter"], source),
        state=StateConfig(dir=state_dir),
        source=source,
    )
