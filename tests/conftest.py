"""Shared test fixtures: a fake upstream and a real daemon on loopback ports.

Client classes used throughout (see running_daemon's config):
  127.0.0.x   managed (the policy applies)      127.0.1.x   served, unmanaged (BYOD)
  127.2.0.1   not in allow_clients (REFUSED)    127.0.0.20  allowlisted device (when added)
  127.0.0.53  trusted relay for the EDNS0 MAC option
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.edns
import dns.message
import dns.rdatatype
import pytest

from tests import reaper
from tests.fakes import FakeUpstream, free_port, release_ports
from tests.pg import SKIP as PG_SKIP
from tests.pg import PgServer
from tests.pg import start_server as start_pg
from tiktokguard.config import load_config
from tiktokguard.daemon import Daemon

MANAGED = "127.0.0.5"
UNMANAGED = "127.0.1.5"
OUTSIDER = "127.2.0.1"
DEVICE_IP = "127.0.0.20"
RELAY = "127.0.0.53"

reaper.claim()  # before any test module is imported: all they start carries this run's mark


def pytest_sessionstart(session: pytest.Session) -> None:
    reaper.install()  # ends what killed runs left; this run's leftovers are ended at its exit


@pytest.fixture(autouse=True)
def _ports_held_for_the_test() -> Iterator[None]:
    """free_port() holds each port it hands out until the test ends (tests/fakes.py)."""
    yield
    release_ports()


@dataclass
class Running:
    daemon: Daemon
    port: int
    http_port: int | None
    config_path: Path

    async def ask(self, name: str, rdtype: str = "A", source: str = MANAGED, tcp: bool = False,
                  use_edns: bool = True, options: list[Any] | None = None, payload: int = 1232,
                  wait: float = 3.0) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, use_edns=0 if use_edns else False,
                                   payload=payload, options=options or [])
        if tcp:
            return await dns.asyncquery.tcp(q, "127.0.0.1", port=self.port, source=source,
                                            timeout=wait)
        return await dns.asyncquery.udp(q, "127.0.0.1", port=self.port, source=source,
                                        timeout=wait, ignore_trailing=False)

    @property
    def metrics(self) -> Any:
        return self.daemon.metrics

    async def add_device(self, **fields: Any) -> str:
        """Allowlist a device through the device service (as the API does); returns its id."""
        body = {"name": "phone", "custodian": "C. Custodian", "supervisor": "S. Supervisor",
                "ticket": "SR-1", **fields}
        assert self.daemon.devices_service is not None
        return (await self.daemon.devices_service.create(body, "test")).id


def write_config(tmp_path: Path, upstreams: list[str], port: int, http_port: int | None,
                 extra: str = "") -> Path:
    upstream_list = ", ".join(f'"{u}"' for u in upstreams)
    http = f'"127.0.0.1:{http_port}"' if http_port else '""'
    text = f"""
[dns]
listen = ["127.0.0.1:{port}"]
upstreams = [{upstream_list}]
upstream_timeout_ms = 300
allow_clients = ["127.0.0.0/15", "::1/128"]
cache_size = 1000

[policy]
managed_networks = ["127.0.0.0/24", "::1/128"]
edns_mac_trusted_relays = ["{RELAY}/32"]

[http]
listen = {http}

[state]
dir = "state"
"""
    path = tmp_path / "tiktokguard.toml"
    path.write_text(_merge(text, extra))
    return path


def _merge(base: str, extra: str) -> str:
    """Add extra `key = value` lines to their [section] of base, replacing same-named keys."""
    if not extra.strip():
        return base
    lines = base.splitlines()
    section = None
    for raw in extra.strip().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
            if section not in lines:
                lines.append(section)
            continue
        key = line.split("=", 1)[0].strip()
        start = lines.index(section) if section else 0
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")),
                   len(lines))
        for i in range(start + 1, end):
            if lines[i].split("=", 1)[0].strip() == key:
                lines[i] = line
                break
        else:
            lines.insert(end, line)
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def running_daemon(tmp_path: Path, upstreams: list[str], extra: str = "",
                         http: bool = False, clock: Callable[[], float] | None = None,
                         prepare: Callable[[Daemon], None] | None = None,
                         store_dsn: str | None = None, instance: str = "test"
                         ) -> AsyncIterator[Running]:
    """A daemon on loopback ports with its config in tmp_path (its state in tmp_path/state);
    with store_dsn, its devices, audit, tokens and incidents in that PostgreSQL database."""
    port = free_port()
    http_port = free_port() if http else None
    if store_dsn is not None:
        extra += f'\n[store]\nbackend = "postgres"\ndsn = "{store_dsn}"\ninstance = "{instance}"\n'
    path = write_config(tmp_path, upstreams, port, http_port, extra)
    config = load_config(path)
    daemon = Daemon(config, **({"clock": clock} if clock else {}))
    if prepare is not None:
        prepare(daemon)  # e.g. swap a kernel-facing part for a stand-in, before anything runs
    async with contextlib.AsyncExitStack() as stack:
        await daemon.start(stack)
        yield Running(daemon, port, http_port, path)
        await daemon.server.drain(2)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the whole run, started on first use (tests/pg.py)."""
    if PG_SKIP is not None:
        pytest.skip(PG_SKIP)
    server = start_pg()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_dsn(request: pytest.FixtureRequest) -> str | None:
    """Run a test on each store: None (SQLite) or a fresh PostgreSQL database's DSN."""
    if request.param == "sqlite":
        return None
    server: PgServer = request.getfixturevalue("pg_server")
    return server.database()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream().start()
    yield fake
    fake.close()


@pytest.fixture
async def tg(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[Running]:
    async with running_daemon(tmp_path, [upstream.address]) as running:
        yield running


def ede_codes(message: dns.message.Message) -> list[int]:
    return [o.code for o in message.options if isinstance(o, dns.edns.EDEOption)]


def queries(tg: Running, decision: str, transport: str = "udp") -> float:
    """tiktokguard_dns_queries_total for one decision and transport."""
    return tg.metrics.sample("tiktokguard_dns_queries_total", transport=transport,
                             decision=decision)
