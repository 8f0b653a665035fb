"""Config parsing, apart from behaviour: defaults, overrides, and one clear error per mistake."""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path

import pytest

from tiktokguard.config import (
    BUNDLED_LISTS,
    ConfigError,
    HostPort,
    Overrides,
    load_config,
    parse_hostport,
    resolv_conf_upstreams,
)


@pytest.fixture
def resolv(tmp_path: Path) -> Path:
    path = tmp_path / "resolv.conf"
    path.write_text("# test\nsearch example\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n"
                    "nameserver not-an-ip\n")
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tg.toml"
    path.write_text(text)
    return path


def test_embedded_default(resolv: Path) -> None:
    config = load_config(None, resolv_conf=resolv)
    assert config.dns.listen == (HostPort("127.0.0.1", 5353),)
    assert config.http.listen == HostPort("127.0.0.1", 8053)
    assert config.dns.upstreams == (HostPort("192.0.2.53", 53), HostPort("fe80::1", 53))
    assert config.policy.managed_networks == (ipaddress.ip_network("127.0.0.0/8"),
                                              ipaddress.ip_network("::1/128"))
    assert [s.path for s in config.policy.blocklists] == [
        (BUNDLED_LISTS / "tiktok-bytedance.txt").resolve()]
    assert config.policy.blocklists[0].mode == "strict"  # the bundled list is read strictly
    assert config.policy.block_mode == "nxdomain" and config.policy.block_ttl == 300
    assert config.policy.bypass_countermeasures is True
    assert config.state.dir == Path.cwd() / "tiktokguard-state"


def test_resolv_conf_missing_gives_no_upstreams(tmp_path: Path) -> None:
    assert resolv_conf_upstreams(tmp_path / "nope") == ()
    with pytest.raises(ConfigError, match=r"\[dns\] upstreams: none configured"):
        load_config(None, resolv_conf=tmp_path / "nope")


def test_full_file_and_overrides(tmp_path: Path, resolv: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "extra.txt").write_text("example.org\n")
    path = write(tmp_path, """
[dns]
listen = ["127.0.0.1:5300", "[::1]:5300"]
upstreams = ["192.0.2.1", "[2001:db8::1]:5353", "2001:db8::2"]
upstream_timeout_ms = 800
allow_clients = ["10.0.0.0/8"]
cache_size = 10

[policy]
managed_networks = ["10.1.0.0/16"]
blocklists = ["blocklists/tiktok-bytedance.txt", "lists/extra.txt"]
block_mode = "redirect"
redirect_ipv4 = "192.0.2.80"
edns_mac_trusted_relays = ["10.1.0.1"]

[http]
listen = ""
tokens.ops = { role = "viewer", sha256 = "OPS_HASH" }

[incidents]
window_seconds = 60

[state]
dir = "state"
""".replace("OPS_HASH", hashlib.sha256(b"ops-token").hexdigest()))
    config = load_config(path, Overrides(upstreams=("192.0.2.9:5353",)), resolv_conf=resolv)
    assert config.dns.listen == (HostPort("127.0.0.1", 5300), HostPort("::1", 5300))
    assert config.dns.upstreams == (HostPort("192.0.2.9", 5353),)
    assert config.policy.blocklists[1].path == (tmp_path / "lists" / "extra.txt").resolve()
    assert config.policy.blocklists[1].mode == "local"
    assert config.http.listen is None and config.http.tokens["ops"].role == "viewer"
    assert config.state.dir == tmp_path / "state"
    assert config.source == str(path)
    no_override = load_config(path, resolv_conf=resolv)
    assert no_override.dns.upstreams == (HostPort("192.0.2.1", 53), HostPort("2001:db8::1", 5353),
                                         HostPort("2001:db8::2", 53))


@pytest.mark.parametrize(("text", "message"), [
    ("[dns]\nlisten = [\"127.0.0.1:99999\"]", r"\[dns\] listen: \[0\]: invalid port '99999'"),
    ("[dns]\nlisten = [\"127.0.0.1\"]", r"\[dns\] listen: \[0\]: missing port"),
    ("[dns]\nlisten = [\"localhost:53\"]", r"\[dns\] listen: \[0\]: 'localhost' is not an IP"),
    ("[dns]\nallow_clients = [\"10.0.0.0/33\"]", r"\[dns\] allow_clients: \[0\]: '10.0.0.0/33'"),
    ("[policy]\nmanaged_networks = [\"campus\"]", r"\[policy\] managed_networks: \[0\]"),
    ("[policy]\nblock_mode = \"sinkhole\"", r"\[policy\] block_mode: expected one of"),
    ("[policy]\nblock_mode = \"redirect\"", r"\[policy\] block_mode: \"redirect\" needs"),
    ("[policy]\nblocklists = [\"nope.txt\"]", r"\[policy\] blocklists\[0\]: list file not found"),
    ("[policy]\ndoh_lists = [\"nope.txt\"]", r"\[policy\] doh_lists\[0\]: list file not found"),
    ("[policy]\nblock_public_doh = 1", r"\[policy\] block_public_doh: expected true"),
    ("[netfilter]\nexempt_v4 = \"tiktok_v4\"", r"\[netfilter\] exempt_v4: must differ from set_v4"),
    ("[netfilter]\nexempt_mac = \"x-y\"", r"\[netfilter\] exempt_mac: expected a name"),
    ("[policy]\nblock_ttl = -1", r"\[policy\] block_ttl: -1 is out of range"),
    ("[policy]\nbypass_countermeasures = \"yes\"", r"bypass_countermeasures: expected true"),
    ("[dns]\ncache_size = \"big\"", r"\[dns\] cache_size: expected a whole number"),
    ("[dns]\nlisten_on = []", r"unknown key \[dns\] listen_on"),
    ("[dnss]\n", r"unknown section \[dnss\]"),
    ("[dns\n", r"not valid TOML"),
    ("[http]\ntokens.x = { role = \"root\", sha256 = \"00\" }", r"\[http\] tokens: .x.role"),
    ("[dns]\nupstreams = [\"127.0.0.1:5353\"]", r"upstreams\[0\]: 127.0.0.1:5353 is one of our"),
])
def test_errors_name_key_and_file(tmp_path: Path, resolv: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, resolv_conf=resolv)
    assert str(err.value).startswith(str(path) + ": ")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_bad_override_names_the_flag(resolv: Path) -> None:
    with pytest.raises(ConfigError, match="--dns-listen: invalid port"):
        load_config(None, Overrides(dns_listen=("127.0.0.1:0",)), resolv_conf=resolv)


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.1:53", HostPort("192.0.2.1", 53)),
    ("[::1]:5353", HostPort("::1", 5353)),
    ("::1", HostPort("::1", 53)),
    ("192.0.2.1", HostPort("192.0.2.1", 53)),
])
def test_parse_hostport(text: str, expected: HostPort) -> None:
    assert parse_hostport(text, default_port=53) == expected
