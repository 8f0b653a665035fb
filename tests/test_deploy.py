"""Deployment files: the example configs load, the unit and the Dockerfile say what the README
says. (systemd-analyze and hadolint themselves run in .ci/run.)"""

from __future__ import annotations

import configparser
from pathlib import Path

from tiktokguard.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_configs_load(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    campus = load_config(ROOT / "systemd" / "tiktokguard.toml", resolv_conf=resolv)
    assert len(campus.dns.upstreams) == 2 and len(campus.policy.managed_networks) == 4
    # No placeholder tokens (they would be a config error, and stop the admin token's creation).
    assert campus.http.tokens == {}
    docker = load_config(ROOT / "docker" / "tiktokguard.toml", resolv_conf=resolv)
    assert str(docker.dns.listen[0]) == "0.0.0.0:53"
    assert str(docker.state.dir) == "/var/lib/tiktokguard"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "systemd" / "tiktokguard.service")
    return parser


def test_unit_is_notify_with_watchdog_reload_and_least_privilege() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"] and service["ExecReload"].endswith("-HUP $MAINPID")
    assert service["DynamicUser"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert service["RestartPreventExitStatus"] == "2"  # a bad config must not restart-loop
    assert "serve" in service["ExecStart"] and "${STATE_DIRECTORY}" in service["ExecStart"]
    dropin = (ROOT / "systemd" / "tiktokguard.service.d" / "netfilter.conf").read_text()
    assert "CAP_NET_ADMIN" in dropin


def test_dockerfile_runs_as_non_root_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") == 2  # multi-stage
    assert "USER 10053:10053" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert "EXPOSE 53/udp 53/tcp 8053/tcp" in text
    assert (ROOT / ".dockerignore").is_file()
