"""Two resolvers, one allowlist: a PostgreSQL store shared by two daemons, against a real server
the tests start (tests/pg.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DEVICE_IP, Running, running_daemon
from tests.fakes import FakeUpstream
from tests.pg import PASSWORD_USER, PgServer, _bindir
from tests.test_api import ADMIN, PHONE, TOKENS, Api

pytestmark = pytest.mark.asyncio


async def blocked(tg: Running, source: str) -> bool:
    reply = await tg.ask("www.tiktok.com", source=source)
    return bool(reply.authority) and reply.authority[0].name.to_text() == "tiktok.com."


@contextlib.asynccontextmanager
async def two_instances(tmp_path: Path, upstream: FakeUpstream, dsn: str
                        ) -> AsyncIterator[tuple[Api, Api]]:
    async with contextlib.AsyncExitStack() as stack:
        apis = []
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            tg = await stack.enter_async_context(running_daemon(
                folder, [upstream.address], extra=TOKENS, http=True, store_dsn=dsn,
                instance=f"resolver-{name}"))
            session = await stack.enter_async_context(aiohttp.ClientSession())
            apis.append(Api(tg, session))
        yield apis[0], apis[1]


def applied(api: Api) -> asyncio.Event:
    """Set when the instance puts a device change in force (its own or another's)."""
    event = asyncio.Event()
    assert api.tg.daemon.devices_service is not None
    api.tg.daemon.devices_service.on_change.append(event.set)
    return event


async def test_a_device_added_on_one_instance_is_exempt_on_the_other_within_a_second(
        tmp_path: Path, upstream: FakeUpstream, pg_server: PgServer) -> None:
    async with two_instances(tmp_path, upstream, pg_server.database()) as (a, b):
        delays = []
        for trial in range(20):
            source = f"127.0.0.{100 + trial}"
            assert await blocked(b.tg, source)
            event = applied(b)
            started = time.perf_counter()
            status, device = await a.call("POST", "/api/v1/devices",
                                          json=dict(PHONE, addresses=[source]))
            assert status == 201, device
            async with asyncio.timeout(1.0):  # within a second, or the test fails
                while not b.tg.daemon.devices.devices.get(device["id"]):
                    await event.wait()
                    event.clear()
            delays.append((time.perf_counter() - started) * 1000)
            assert not await blocked(b.tg, source)  # exempt on B, over real DNS
            status, _ = await a.call("DELETE", f"/api/v1/devices/{device['id']}")
            assert status == 200
            async with asyncio.timeout(1.0):
                while b.tg.daemon.devices.devices[device["id"]].active:
                    await event.wait()
                    event.clear()
            assert await blocked(b.tg, source)  # and blocked again once deactivated
        print(f"add on A -> in force on B: p50 {statistics.median(delays):.1f} ms, "
              f"max {max(delays):.1f} ms over {len(delays)} trials")
        # One audit trail for both, each entry naming the instance that made it.
        _status, audit = await b.call("GET", "/api/v1/audit?limit=1000")
        assert len(audit["entries"]) == 40
        assert {e["instance"] for e in audit["entries"]} == {"resolver-a"}


async def test_expiry_is_audited_once_across_instances(
        tmp_path: Path, upstream: FakeUpstream, pg_server: PgServer) -> None:
    async with two_instances(tmp_path, upstream, pg_server.database()) as (a, b):
        soon = datetime.now(UTC) + timedelta(seconds=1)
        status, device = await a.call("POST", "/api/v1/devices", json=dict(
            PHONE, expires_at=soon.isoformat().replace("+00:00", "Z")))
        assert status == 201
        events = (applied(a), applied(b))
        async with asyncio.timeout(10):
            while True:  # both watchers reach the expiry; one of them audits it
                _status, audit = await a.call("GET", f"/api/v1/audit?device_id={device['id']}")
                if any(e["action"] == "expire" for e in audit["entries"]):
                    break
                await asyncio.wait([asyncio.ensure_future(e.wait()) for e in events],
                                   return_when=asyncio.FIRST_COMPLETED)
                for event in events:
                    event.clear()
        for api in (a, b):  # give the other watcher its turn, then count
            assert api.tg.daemon.devices_service is not None
            await api.tg.daemon.devices_service.audit_expiries()
        _status, audit = await b.call("GET", f"/api/v1/audit?device_id={device['id']}")
        assert [e["action"] for e in audit["entries"]] == ["create", "expire"]
        assert await blocked(a.tg, DEVICE_IP) and await blocked(b.tg, DEVICE_IP)


def single_user_sql(server: PgServer, database: str, statement: str) -> None:
    """Run SQL with the server stopped (postgres --single): a change that no running instance
    could have been told about."""
    bindir = _bindir()
    assert bindir is not None
    command = [str(bindir / "postgres"), "--single", "-D", str(server.data), database]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, input=statement + "\n", capture_output=True, text=True, check=True,
                   timeout=60)


async def test_with_the_database_down_dns_goes_on_and_writes_get_503(
        tmp_path: Path, upstream: FakeUpstream, pg_server: PgServer) -> None:
    dsn = pg_server.database()
    database = dsn.split("dbname=")[1].split()[0]
    async with two_instances(tmp_path, upstream, dsn) as (a, b):
        status, device = await a.call("POST", "/api/v1/devices", json=PHONE)
        assert status == 201
        event = applied(b)
        async with asyncio.timeout(1.0):
            while device["id"] not in b.tg.daemon.devices.devices:
                await event.wait()
                event.clear()
        pg_server.pause()
        try:
            for api in (a, b):  # both keep deciding from the devices as last known
                assert not await blocked(api.tg, DEVICE_IP)
                assert await blocked(api.tg, "127.0.0.5")
                status, body = await api.call("POST", "/api/v1/devices",
                                              json=dict(PHONE, addresses=["127.0.0.99"]))
                assert status == 503 and "unavailable" in body["error"], body
                status, ready = await api.call("GET", "/readyz", token=None)
                assert status == 200 and ready["status"] == "degraded", ready
                assert ready["components"]["store"]["state"].startswith("degraded")
            assert a.tg.metrics.sample("tiktokguard_store_up") == 0
            # Meanwhile, a change straight in the database (no instance is told of it).
            single_user_sql(pg_server, database, (
                "INSERT INTO devices VALUES ('dev-direct', 'direct', '[\"127.0.0.77\"]', '[]', "
                "'c', 's', 't', 'l', NULL, true, '2026-01-01T00:00:00.000Z', "
                "'2026-01-01T00:00:00.000Z', false);"))
        finally:
            pg_server.resume()
        event = applied(b)
        async with asyncio.timeout(20):  # the watcher's back-off is 10 s at most
            while "dev-direct" not in b.tg.daemon.devices.devices:
                await event.wait()
                event.clear()
        assert not await blocked(b.tg, "127.0.0.77")
        status, _ = await b.call("POST", "/api/v1/devices",
                                 json=dict(PHONE, addresses=["127.0.0.98"]))
        assert status == 201  # writes work again
        assert b.tg.metrics.sample("tiktokguard_store_up") == 1


async def test_a_restart_while_the_database_is_down_keeps_the_devices(
        tmp_path: Path, upstream: FakeUpstream, pg_server: PgServer) -> None:
    dsn = pg_server.database()
    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True,
                              store_dsn=dsn) as tg, aiohttp.ClientSession() as session:
        status, _ = await Api(tg, session).call("POST", "/api/v1/devices", json=PHONE)
        assert status == 201
    pg_server.pause()
    try:
        async with running_daemon(tmp_path, [upstream.address], extra=TOKENS, http=True,
                                  store_dsn=dsn) as tg:
            assert not await blocked(tg, DEVICE_IP)  # from the local snapshot
            assert tg.metrics.sample("tiktokguard_store_up") == 0
    finally:
        pg_server.resume()


async def test_a_database_down_at_start_is_logged_once_with_its_cause(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """The start says it (cause, devices known); the watcher's retries say nothing more until
    the store comes back, and the incidents waiting for it do not add their own line."""
    from structlog.testing import capture_logs

    pytest.importorskip("asyncpg")
    accepted = 0
    third = asyncio.Event()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        if accepted >= 3:
            third.set()
        writer.close()  # a "database" that drops every connection

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dsn = f"host=127.0.0.1 port={port} dbname=x user=y"
    try:
        with capture_logs() as logs:
            async with running_daemon(tmp_path, [upstream.address], store_dsn=dsn) as tg:
                assert await blocked(tg, "127.0.0.5")  # DNS goes on; an incident waits
                # The start's attempt, the watcher's first, and its retry after the back-off:
                # the first two have been handled (and logged, or not) by then.
                await asyncio.wait_for(third.wait(), 10)
    finally:
        server.close()
        await server.wait_closed()
    down = [e for e in logs if e["event"] == "store_unavailable"]
    assert len(down) == 1, down
    assert "database unreachable: " in down[0]["error"] and down[0]["devices"]
    assert not [e for e in logs if e["event"] == "incident_flush_failed"]


async def test_two_instances_starting_together_make_one_schema(pg_server: PgServer) -> None:
    from tiktokguard.devices.pgstore import MIGRATIONS, PostgresStore

    dsn = pg_server.database()
    stores = await asyncio.gather(*(PostgresStore.open(dsn, None, f"i{n}") for n in range(4)))
    for store in stores:
        await store.close()
    versions = pg_server.sql("SELECT version FROM tiktokguard_schema ORDER BY version",
                             dsn.split("dbname=")[1].split()[0])
    assert versions.split() == [str(n) for n in range(1, len(MIGRATIONS) + 1)]


async def test_the_password_comes_from_a_file_never_the_dsn(
        tmp_path: Path, pg_server: PgServer) -> None:
    from tiktokguard.devices.pgstore import PostgresStore, read_password
    from tiktokguard.devices.store import StoreUnavailable

    dsn = pg_server.database().replace("user=postgres", f"user={PASSWORD_USER}")
    with pytest.raises(StoreUnavailable, match="refused"):
        await PostgresStore.open(dsn, None, "x")
    secret = tmp_path / "db.password"
    secret.write_text(pg_server.password + "\n")
    store = await PostgresStore.open(dsn, read_password(str(secret)), "x")
    assert await store.load_devices() == []
    await store.close()


async def test_the_servers_certificate_is_checked_against_sslrootcert(
        tmp_path: Path, pg_server: PgServer) -> None:
    """sslmode=verify-full with the CA in the DSN, as the operations guide has it: TLS to the
    server, its certificate chained to that CA and naming the host; another CA is refused."""
    import ssl

    from tiktokguard.config import dsn_arguments
    from tiktokguard.devices.pgstore import PostgresStore
    from tiktokguard.devices.store import StoreUnavailable

    if pg_server.ca is None:
        pytest.skip("the test server has no certificate (needs openssl)")
    dsn = pg_server.database()
    store = await PostgresStore.open(f"{dsn} sslmode=verify-full sslrootcert={pg_server.ca}",
                                     None, "x")
    assert await store.load_devices() == []
    assert store.pool is not None
    async with store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    await store.close()
    # The wrong name (verify-full checks it) and a CA that did not sign the certificate.
    other = tmp_path / "other-ca.pem"
    await asyncio.to_thread(
        subprocess.run, ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                         "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(tmp_path / "k"),
                         "-out", str(other), "-days", "1", "-subj", "/CN=other"],
        check=True, capture_output=True, timeout=60)
    for bad in (f"{dsn} sslmode=verify-full sslrootcert={other}",
                f"{dsn.replace('127.0.0.1', '127.0.0.2')} sslmode=verify-full "
                f"sslrootcert={pg_server.ca}"):
        with pytest.raises(StoreUnavailable, match="certificate"):
            await PostgresStore.open(bad, None, "x")
    # Checked when the config is read: a missing file, or a mode that would not use it.
    with pytest.raises(ValueError, match="sslrootcert /nonexistent"):
        dsn_arguments("host=h sslmode=verify-full sslrootcert=/nonexistent")
    with pytest.raises(ValueError, match="needs sslmode=verify-full"):
        dsn_arguments(f"host=h sslmode=require sslrootcert={pg_server.ca}")
    context = dsn_arguments(f"host=h sslmode=verify-ca sslrootcert={pg_server.ca}")["ssl"]
    assert isinstance(context, ssl.SSLContext) and not context.check_hostname


async def test_migrate_copies_a_single_box_into_the_shared_store(
        tmp_path: Path, upstream: FakeUpstream, pg_server: PgServer) -> None:
    import sys

    from tiktokguard.daemon import in_use

    dsn = pg_server.database()
    config = tmp_path / "shared.toml"
    config.write_text(f'[dns]\nupstreams = ["192.0.2.1"]\n[store]\nbackend = "postgres"\n'
                      f'dsn = "{dsn}"\ninstance = "old-box"\n')
    argv = [sys.executable, "-m", "tiktokguard", "migrate", "--from-sqlite",
            str(tmp_path / "state"), "--config", str(config)]
    async with running_daemon(tmp_path, [upstream.address], extra=TOKENS,
                              http=True) as tg, aiohttp.ClientSession() as session:
        status, _device = await Api(tg, session).call("POST", "/api/v1/devices", json=PHONE)
        assert status == 201
        # Copied while the single box still runs: it is done, with a warning.
        assert in_use(tmp_path / "state")
        done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                       timeout=60)
    assert done.returncode == 0, done.stderr
    assert "1 devices" in done.stdout and "1 audit" in done.stdout
    assert "warning: a running tiktokguard uses" in done.stderr
    assert not in_use(tmp_path / "state")  # let go when the daemon stops
    again = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                    timeout=60)
    assert again.returncode == 2 and "already holds" in again.stderr  # never duplicated
    assert "warning" not in again.stderr
    async with running_daemon(tmp_path / "state", [upstream.address], extra=TOKENS, http=True,
                              store_dsn=dsn) as tg, aiohttp.ClientSession() as session:
        assert not await blocked(tg, DEVICE_IP)
        status, audit = await Api(tg, session).call("GET", "/api/v1/audit", token=ADMIN)
        import socket

        # The single box's entries keep the name it wrote them under (its host name).
        assert [e["instance"] for e in audit["entries"]] == [socket.gethostname()[:64]]
