"""The command line, run as a real process: `check`, `serve` on the embedded default, bad config,
SIGHUP reload and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from tests.conftest import write_config
from tests.daemons import serve
from tests.fakes import FakeUpstream, free_port

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "tiktokguard"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30,
                          cwd=cwd or ROOT)


def check(*args: str) -> subprocess.CompletedProcess[str]:
    """`tiktokguard check` deciding without allowlisted devices (no state to read here)."""
    return run_cli("check", "--without-devices", *args)


def test_check_blocked_name_prints_rule_and_exits_1() -> None:
    result = check("www.tiktok.com")
    assert result.returncode == 1, result.stderr
    assert result.stdout.split("\t")[0] == "blocked"
    assert "rule=tiktok.com" in result.stdout
    assert "client=127.0.0.1 (managed)" in result.stdout


def test_check_other_name_and_other_clients(tmp_path: Path) -> None:
    assert check("example.org").returncode == 0
    config = write_config(tmp_path, ["192.0.2.1:53"], 5300, None)
    unmanaged = check("www.tiktok.com", "--client", "127.0.1.9", "--config",
                        str(config))
    assert unmanaged.returncode == 0 and unmanaged.stdout.startswith("unmanaged")
    refused = check("a.test", "--client", "127.2.0.1", "--config", str(config))
    assert refused.returncode == 1 and refused.stdout.startswith("refused")


def test_check_names_the_exception_that_allowed_a_name(tmp_path: Path) -> None:
    config = write_config(tmp_path, ["192.0.2.1:53"], 5300, None,
                          '[policy]\nexceptions = ["developers.tiktok.com"]')
    result = check("api.developers.tiktok.com", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("allowed")
    assert "exception=developers.tiktok.com" in result.stdout
    assert check("www.tiktok.com", "--config", str(config)).returncode == 1


def test_check_refuses_urls_and_missing_state_instead_of_a_confident_wrong_answer(
        tmp_path: Path) -> None:
    url = check("https://www.tiktok.com/@user")
    assert url.returncode == 2 and "the name in it is 'www.tiktok.com'" in url.stderr
    missing = run_cli("check", "www.tiktok.com", "--state-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert str(tmp_path / "nowhere" / "tiktokguard.sqlite3") in missing.stderr


def test_check_usage_errors() -> None:
    assert check("www.tiktok.com", "--client", "nope").returncode == 2
    bad = check("a..b")
    assert bad.returncode == 2 and "invalid name" in bad.stderr


def test_bad_config_exits_2_naming_key_and_file_before_binding(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "bad.toml"
    config.write_text(f'[dns]\nlisten = ["127.0.0.1:{port}"]\nupstreams = ["192.0.2.1"]\n'
                      '[policy]\nmanaged_networks = ["10.0.0.0/99"]\n')
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert str(config) in result.stderr and "[policy] managed_networks" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))  # nothing was bound


def test_broken_list_at_start_exits_2_with_file_and_line(tmp_path: Path) -> None:
    lists = tmp_path / "l.txt"
    lists.write_text("tiktok.com\nnot a domain\n")
    config = tmp_path / "c.toml"
    config.write_text(f'[dns]\nupstreams = ["192.0.2.1"]\n[policy]\nblocklists = ["{lists}"]\n')
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2 and f"{lists}:2" in result.stderr


def port_free(port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            u.bind(("127.0.0.1", port))
            t.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not (port_free(5353) and port_free(8053)),
                    reason="127.0.0.1:5353 or :8053 is taken on this machine")
async def test_serve_with_no_arguments_runs_the_embedded_default(tmp_path: Path) -> None:
    async with serve(cwd=tmp_path) as running:
        for tcp in (False, True):
            q = dns.message.make_query("www.tiktok.com", "A", use_edns=0)
            send = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
            reply = await send(q, "127.0.0.1", port=5353, timeout=3)
            assert reply.rcode() == dns.rcode.NXDOMAIN
            assert [o.code for o in reply.options] == [15]
        async with aiohttp.ClientSession() as http:
            async with http.get("http://127.0.0.1:8053/healthz") as resp:
                assert resp.status == 200
            async with http.get("http://127.0.0.1:8053/metrics") as resp:
                text = await resp.text()
                assert 'tiktokguard_dns_queries_total{decision="blocked",transport="udp"} 1.0' \
                    in text
        running.proc.send_signal(signal.SIGTERM)
        await running.event("stopped")
        assert await running.exited() == 0


async def test_sighup_reloads_lists_without_restart(tmp_path: Path) -> None:
    upstream = await FakeUpstream().start()
    try:
        lists = tmp_path / "mine.txt"
        lists.write_text("tiktok.com\n")
        port = free_port()
        config = write_config(tmp_path, [upstream.address], port, None,
                              f'[policy]\nblocklists = ["{lists}"]')
        async with serve("--config", str(config), cwd=tmp_path) as running:
            q = dns.message.make_query("www.douyin.com", "A")
            reply = await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=3)
            assert reply.authority[0].name.to_text() == "test."  # forwarded
            lists.write_text("tiktok.com\ndouyin.com\n")
            running.proc.send_signal(signal.SIGHUP)
            record = await running.event("blocklists_reloaded")
            assert record["rules"] == 2
            reply = await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=3)
            assert reply.authority[0].name.to_text() == "douyin.com."
            lists.write_text("tiktok.com\n0.0.0.0 a b\n")
            running.proc.send_signal(signal.SIGHUP)
            record = await running.event("blocklists_reload_failed")
            assert f"{lists}:2" in str(record["error"]) and record["kept_rules"] == 2
            reply = await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=3)
            assert reply.authority[0].name.to_text() == "douyin.com."
            running.proc.send_signal(signal.SIGTERM)
            assert await running.exited() == 0
    finally:
        upstream.close()


async def test_check_knows_the_allowlisted_devices(tmp_path: Path) -> None:
    from tiktokguard.daemon import DB_FILE
    from tiktokguard.devices.service import DeviceService
    from tiktokguard.devices.store import SqliteStore
    from tiktokguard.policy.clients import DeviceIndex

    store = await SqliteStore.open(tmp_path / "state" / DB_FILE)
    try:
        await DeviceService(store, DeviceIndex()).create(
            {"name": "phone", "addresses": ["127.0.0.20"], "custodian": "c", "supervisor": "s",
             "ticket": "SR-1"}, "test")
    finally:
        await store.close()
    assert os.stat(tmp_path / "state" / DB_FILE).st_mode & 0o077 == 0  # owner only
    result = run_cli("check", "www.tiktok.com", "--client", "127.0.0.20", "--state-dir",
                     str(tmp_path / "state"))
    assert result.returncode == 0 and result.stdout.startswith("allowlisted"), result.stderr
    other = run_cli("check", "www.tiktok.com", "--client", "127.0.0.21", "--state-dir",
                    str(tmp_path / "state"))
    assert other.returncode == 1 and other.stdout.startswith("blocked")


def test_a_newer_schema_exits_2_with_one_line(tmp_path: Path) -> None:
    import sqlite3

    from tests.fakes import free_port

    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "tiktokguard.sqlite3") as db:
        db.execute("PRAGMA user_version = 999")
    result = run_cli("serve", "--state-dir", str(state), "--upstream", "127.0.0.1:9",
                     "--dns-listen", f"127.0.0.1:{free_port()}",
                     "--http-listen", f"127.0.0.1:{free_port()}", cwd=tmp_path)
    # 2: the unit's RestartPreventExitStatus, so systemd does not restart it in a loop.
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "schema version 999 is newer" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


async def test_tokens_audit_and_incidents_commands_with_config_and_token_file(
        tmp_path: Path) -> None:
    from tests.fakes import free_port

    port, http_port = free_port(), free_port()
    config = tmp_path / "tg.toml"
    config.write_text(f'[dns]\nlisten = ["127.0.0.1:{port}"]\nupstreams = ["192.0.2.1"]\n'
                      f'[http]\nlisten = "127.0.0.1:{http_port}"\n[state]\ndir = "state"\n')
    async with serve("--config", str(config), cwd=tmp_path):
        async def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(run_cli, *args, cwd=ROOT)
        # --config: the API's address and the state folder's admin token, from anywhere.
        created = await cli("tokens", "--config", str(config), "create", "jane.doe",
                            "--role", "admin")
        assert created.returncode == 0, created.stderr
        # The token alone on stdout (for `TOKEN=$(tiktokguard tokens create ...)`), the note
        # on stderr.
        token = created.stdout.strip()
        assert len(created.stdout.splitlines()) == 1 and " " not in token, created.stdout
        assert "shown once" in created.stderr
        token_file = tmp_path / "jane.token"
        token_file.write_text(token + "\n")
        api = f"http://127.0.0.1:{http_port}"
        added = await cli("devices", "--api", api, "--token-file", str(token_file), "add",
                          "--name", "phone", "--address", "127.0.0.20", "--custodian", "C",
                          "--supervisor", "S", "--ticket", "SR-1")
        assert added.returncode == 0, added.stderr
        audit = await cli("audit", "--api", api, "--token-file", str(token_file))
        assert audit.returncode == 0 and "jane.doe" in audit.stdout and "create" in audit.stdout
        listing = await cli("tokens", "--config", str(config), "list")
        assert "jane.doe" in listing.stdout and token not in listing.stdout
        incidents = await cli("incidents", "--config", str(config), "--json")
        assert incidents.returncode == 0 and json.loads(incidents.stdout) == []
        missing = await cli("audit", "--api", api, "--token-file", str(tmp_path / "none"))
        assert missing.returncode == 2 and str(tmp_path / "none") in missing.stderr


@pytest.mark.parametrize("argv", [
    ["devices", "--config", "c.toml", "--api", "http://h:1", "--json", "list", "--all"],
    ["devices", "list", "--config", "c.toml", "--api", "http://h:1", "--json", "--all"],
    ["devices", "--config", "c.toml", "list", "--api", "http://h:1", "--json", "--all"],
], ids=["before", "after", "both"])
def test_shared_options_before_or_after_the_action(argv: list[str]) -> None:
    from tiktokguard.cli import _parser

    args = _parser().parse_args(argv)
    assert (args.config, args.api, args.json, args.all, args.token_file) == \
        ("c.toml", "http://h:1", True, True, None)


def test_shared_options_after_every_action() -> None:
    from tiktokguard.cli import _parser

    tail = ["--config", "c.toml", "--token-file", "t", "--json"]
    for argv in (["devices", "show", "d1"], ["devices", "add", "--name", "n"],
                 ["devices", "update", "d1"], ["devices", "deactivate", "d1"],
                 ["tokens", "create", "jane", "--role", "viewer"], ["tokens", "list"],
                 ["tokens", "revoke", "jane"], ["audit"], ["incidents"]):
        args = _parser().parse_args(argv + tail)
        assert (args.config, args.token_file, args.json) == ("c.toml", "t", True), argv
    # Absent everywhere: the defaults the commands read.
    args = _parser().parse_args(["devices", "list"])
    assert (args.config, args.api, args.token_file, args.json) == (None, None, None, False)


def test_devices_list_states_a_device_as_the_page_does() -> None:
    """An active device past its expires_at is filtered again: `expired`, not `active`."""
    from tiktokguard.devices.cli import _table

    rows = [{"id": "a", "name": "live", "active": True, "expired": False},
            {"id": "b", "name": "old", "active": True, "expired": True},
            {"id": "c", "name": "gone", "active": False, "expired": True}]
    lines = _table(rows).splitlines()
    assert lines[0].split()[2] == "state"
    assert [line.split()[2] for line in lines[1:]] == ["active", "expired", "deactivated"]


def test_a_closed_pipe_ends_the_command_quietly() -> None:
    """`tiktokguard check NAME | head -0`: the reader is gone before the first write."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([*CLI, "check", "--without-devices", "www.tiktok.com"],
                                stdout=write, stderr=subprocess.PIPE, text=True, timeout=30,
                                cwd=ROOT)
    finally:
        os.close(write)
    assert result.returncode == 128 + signal.SIGPIPE
    assert result.stderr == ""


def test_version() -> None:
    from tiktokguard import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"tiktokguard {__version__}"


def test_an_address_in_use_exits_1_so_that_systemd_tries_again(tmp_path: Path) -> None:
    from tests.fakes import free_port

    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        config = tmp_path / "tg.toml"
        config.write_text(f'[dns]\nlisten = ["127.0.0.1:{port}"]\nupstreams = ["192.0.2.1"]\n'
                          '[http]\nlisten = ""\n')
        result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # not 2: RestartPreventExitStatus=2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


async def test_healthz_and_build_info_say_the_version(tmp_path: Path) -> None:
    from tests.conftest import running_daemon
    from tiktokguard import __version__

    async with running_daemon(tmp_path, ["192.0.2.1:53"], http=True) as tg, \
            aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{tg.http_port}/healthz") as response:
        assert (await response.json())["version"] == __version__
    assert tg.metrics.sample("tiktokguard_build_info", version=__version__) == 1


def test_a_state_folder_it_cannot_use_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    config = tmp_path / "tg.toml"
    config.write_text(f'[dns]\nlisten = ["127.0.0.1:{free_port()}"]\nupstreams = ["192.0.2.1"]\n'
                      f'[http]\nlisten = ""\n[state]\ndir = "{blocker / "state"}"\n')
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert str(blocker) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_unreadable_database_password_file_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "tg.toml"
    config.write_text(f'[dns]\nlisten = ["127.0.0.1:{free_port()}"]\nupstreams = ["192.0.2.1"]\n'
                      '[http]\nlisten = ""\n[store]\nbackend = "postgres"\n'
                      'dsn = "host=127.0.0.1 port=9 dbname=x"\n'
                      f'password_file = "{tmp_path / "missing.password"}"\n')
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "missing.password" in result.stderr and len(result.stderr.strip().splitlines()) == 1
