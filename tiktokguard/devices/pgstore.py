"""PostgreSQL behind the Store protocol (asyncpg): one database shared by every resolver.

- Schema migrations run at start inside a transaction holding an advisory lock, so instances
  starting together apply each migration once.
- Every device write is one transaction that also NOTIFYs `tiktokguard_devices` with the device's
  id; every instance LISTENs on a connection of its own and applies the change (see `watch`).
- When the database cannot be reached, every call raises StoreUnavailable (the API answers 503;
  DNS goes on deciding from memory), and the watcher reconnects with back-off, then reloads
  everything, so that changes made meanwhile are not lost.

Times are stored as RFC 3339 text in the one form (tiktokguard.rfc3339), as in SQLite: the same
text comparisons hold for both backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from tiktokguard import rfc3339
from tiktokguard.config import dsn_arguments
from tiktokguard.devices.model import DeviceRecord
from tiktokguard.devices.store import SchemaTooNew, StoreUnavailable
from tiktokguard.logs import get_logger

CHANNEL = "tiktokguard_devices"  # payload: a device id, or TOKENS_CHANGED
TOKENS_CHANGED = "tokens"  # (no device id is this: they start with "dev-")
LOCK_ID = 0x7469_6B74  # pg_advisory_lock key: "tikt"
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0
RECONNECT_SECONDS = (0.5, 10.0)
log = get_logger("tiktokguard.store")

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        addresses JSONB NOT NULL,
        macs JSONB NOT NULL,
        custodian TEXT NOT NULL,
        supervisor TEXT NOT NULL,
        ticket TEXT NOT NULL,
        location TEXT NOT NULL,
        expires_at TEXT,
        active BOOLEAN NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        expiry_audited BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE TABLE audit (
        seq BIGSERIAL PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        device_id TEXT NOT NULL,
        before JSONB,
        after JSONB,
        instance TEXT
    );
    CREATE INDEX audit_device ON audit (device_id, seq);
    CREATE INDEX audit_at ON audit (at);
    CREATE TABLE api_tokens (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE incidents (
        id TEXT PRIMARY KEY,
        client_ip TEXT NOT NULL,
        client_mac TEXT,
        device_name TEXT,
        name TEXT NOT NULL,
        rule TEXT NOT NULL,
        qtype TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        instance TEXT
    );
    CREATE INDEX incidents_first_seen ON incidents (first_seen);
    """,
)

# What a lost or refused connection raises (a broken pooled connection may also report an
# InternalClientError for the operation it was in).
_UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
                asyncpg.InternalClientError)


def read_password(password_file: str) -> str | None:
    """The password: the file's first line, else $TIKTOKGUARD_DB_PASSWORD, else None."""
    if password_file:
        try:
            return Path(password_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise StoreUnavailable(f"cannot read the password file {password_file}: "
                                   f"{getattr(exc, 'strerror', None) or 'empty'}") from None
    return os.environ.get("TIKTOKGUARD_DB_PASSWORD") or None


def _record(row: asyncpg.Record) -> DeviceRecord:
    return DeviceRecord(
        id=row["id"], name=row["name"], addresses=tuple(json.loads(row["addresses"])),
        macs=tuple(json.loads(row["macs"])), custodian=row["custodian"],
        supervisor=row["supervisor"], ticket=row["ticket"], location=row["location"],
        expires_at=rfc3339.parse(row["expires_at"]) if row["expires_at"] else None,
        active=row["active"], created_at=rfc3339.parse(row["created_at"]),
        updated_at=rfc3339.parse(row["updated_at"]))


def _time(value: Any) -> str | None:
    return rfc3339.format_time(value) if value is not None else None


class PostgresStore:
    """Open with `await PostgresStore.open(dsn, password, instance)`."""

    def __init__(self, dsn: str, password: str | None, instance: str) -> None:
        self.dsn = dsn
        self.password = password
        self.instance = instance
        self.pool: asyncpg.Pool | None = None
        self.up = False
        # Why the start could not connect (the daemon logs it); the watcher then does not log
        # its own first failure again.
        self.unavailable: str | None = None

    @classmethod
    async def open(cls, dsn: str, password: str | None, instance: str) -> PostgresStore:
        """Connect and bring the schema up to date. Raises StoreUnavailable when the database
        cannot be reached (the daemon then starts degraded), SchemaTooNew."""
        store = cls(dsn, password, instance)
        await store.connect()
        return store

    async def connect(self) -> None:
        try:
            pool = await asyncpg.create_pool(**dsn_arguments(self.dsn), password=self.password,
                                             min_size=1, max_size=4, timeout=CONNECT_TIMEOUT,
                                             command_timeout=COMMAND_TIMEOUT)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"database unreachable: {_why(exc)}") from None
        except asyncpg.PostgresError as exc:  # authentication, no such database...
            raise StoreUnavailable(f"database refused the connection: {exc}") from None
        try:
            await self._migrate(pool)
        except BaseException:
            await pool.close()
            raise
        self.pool = pool
        self.up = True

    async def _migrate(self, pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn, conn.transaction():
            # Held until the transaction ends: a second instance waits here, then finds the
            # schema current.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_ID)
            await conn.execute("CREATE TABLE IF NOT EXISTS tiktokguard_schema "
                               "(version INTEGER NOT NULL)")
            version = await conn.fetchval("SELECT max(version) FROM tiktokguard_schema") or 0
            if version > len(MIGRATIONS):
                raise SchemaTooNew(f"{self.dsn}: schema version {version} is newer than this "
                                   f"tiktokguard knows ({len(MIGRATIONS)}); upgrade tiktokguard")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                await conn.execute(script)
                await conn.execute("INSERT INTO tiktokguard_schema (version) VALUES ($1)",
                                   number)

    async def _call(self, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        if self.pool is None:
            raise StoreUnavailable("database unreachable")
        try:
            async with self.pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                return await work(conn)
        except _UNAVAILABLE as exc:
            self.up = False
            raise StoreUnavailable(f"database unreachable: {_why(exc)}") from None

    # -- devices ---------------------------------------------------------------------------------

    async def load_devices(self) -> list[DeviceRecord]:
        rows = await self._call(lambda c: c.fetch("SELECT * FROM devices ORDER BY created_at, id"))
        return [_record(r) for r in rows]

    async def load_device(self, device_id: str) -> tuple[DeviceRecord, bool] | None:
        row = await self._call(lambda c: c.fetchrow("SELECT * FROM devices WHERE id = $1",
                                                    device_id))
        return None if row is None else (_record(row), row["expiry_audited"])

    async def save_device(self, record: DeviceRecord, audit: dict[str, Any] | None,
                          expiry_audited: bool | None = None) -> None:
        async def work(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(
                    """INSERT INTO devices (id, name, addresses, macs, custodian, supervisor,
                           ticket, location, expires_at, active, created_at, updated_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                       ON CONFLICT (id) DO UPDATE SET name=excluded.name,
                           addresses=excluded.addresses, macs=excluded.macs,
                           custodian=excluded.custodian, supervisor=excluded.supervisor,
                           ticket=excluded.ticket, location=excluded.location,
                           expires_at=excluded.expires_at, active=excluded.active,
                           updated_at=excluded.updated_at""",
                    record.id, record.name, json.dumps(list(record.addresses)),
                    json.dumps(list(record.macs)), record.custodian, record.supervisor,
                    record.ticket, record.location, _time(record.expires_at), record.active,
                    _time(record.created_at), _time(record.updated_at))
                if expiry_audited is not None:
                    await conn.execute("UPDATE devices SET expiry_audited = $1 WHERE id = $2",
                                       expiry_audited, record.id)
                if audit is not None:
                    await self._insert_audit(conn, audit)
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, record.id)
        await self._call(work)

    async def _insert_audit(self, conn: asyncpg.Connection, audit: dict[str, Any]) -> None:
        await conn.execute(
            "INSERT INTO audit (at, actor, action, device_id, before, after, instance) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7)",
            audit["at"], audit["actor"], audit["action"], audit["device_id"],
            json.dumps(audit["before"]) if audit["before"] is not None else None,
            json.dumps(audit["after"]) if audit["after"] is not None else None, self.instance)

    async def audit_expiry(self, record: DeviceRecord, audit: dict[str, Any]) -> bool:
        """Mark the device's expiry audited and write the audit entry, unless another instance
        did already: True for the one instance that did it."""
        async def work(conn: asyncpg.Connection) -> bool:
            async with conn.transaction():
                claimed = await conn.fetchval(
                    "UPDATE devices SET expiry_audited = TRUE "
                    "WHERE id = $1 AND NOT expiry_audited RETURNING id", record.id)
                if claimed is None:
                    return False
                await self._insert_audit(conn, audit)
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, record.id)
                return True
        return bool(await self._call(work))

    async def expiry_audited(self) -> set[str]:
        rows = await self._call(lambda c: c.fetch("SELECT id FROM devices WHERE expiry_audited"))
        return {r["id"] for r in rows}

    async def audit(self, device_id: str | None = None, since: str | None = None,
                    limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        rows = await self._call(lambda c: c.fetch(
            "SELECT * FROM audit WHERE ($1::text IS NULL OR device_id = $1) "
            "AND ($2::text IS NULL OR at >= $2) ORDER BY seq LIMIT $3 OFFSET $4",
            device_id, since, limit, offset))
        return [{"seq": r["seq"], "at": r["at"], "actor": r["actor"], "action": r["action"],
                 "device_id": r["device_id"],
                 "before": json.loads(r["before"]) if r["before"] else None,
                 "after": json.loads(r["after"]) if r["after"] else None,
                 "instance": r["instance"]} for r in rows]

    # -- API tokens ------------------------------------------------------------------------------

    async def tokens(self) -> dict[str, tuple[str, str]]:
        rows = await self._call(lambda c: c.fetch("SELECT name, role, sha256 FROM api_tokens"))
        return {r["name"]: (r["role"], r["sha256"]) for r in rows}

    async def add_token(self, name: str, role: str, sha256: str, at: str) -> bool:
        """False when a token of that name exists. Every instance is told (NOTIFY)."""
        async def work(conn: asyncpg.Connection) -> bool:
            async with conn.transaction():
                added = await conn.fetchval(
                    "INSERT INTO api_tokens (name, role, sha256, created_at) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING RETURNING name",
                    name, role, sha256, at)
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, TOKENS_CHANGED)
            return added is not None
        return bool(await self._call(work))

    async def delete_token(self, name: str) -> bool:
        async def work(conn: asyncpg.Connection) -> bool:
            async with conn.transaction():
                gone = await conn.fetchval("DELETE FROM api_tokens WHERE name = $1 "
                                           "RETURNING name", name)
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, TOKENS_CHANGED)
            return gone is not None
        return bool(await self._call(work))

    async def token_list(self) -> list[dict[str, str]]:
        rows = await self._call(lambda c: c.fetch(
            "SELECT name, role, created_at FROM api_tokens ORDER BY name"))
        return [{"name": r["name"], "role": r["role"], "created_at": r["created_at"]}
                for r in rows]

    # -- incidents -------------------------------------------------------------------------------

    async def save_incidents(self, rows: list[dict[str, Any]]) -> None:
        await self._call(lambda c: c.executemany(
            """INSERT INTO incidents (id, client_ip, client_mac, device_name, name, rule, qtype,
                   count, first_seen, last_seen, instance)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
               ON CONFLICT (id) DO UPDATE SET count=excluded.count,
                   last_seen=excluded.last_seen""",
            [(r["incident_id"], r["client_ip"], r["client_mac"], r.get("device_name"), r["name"],
              r["rule"], r["qtype"], r["count"], r["first_seen"], r["last_seen"], self.instance)
             for r in rows]))

    async def incidents(self, since: str | None, client: str | None, rule: str | None,
                        limit: int, offset: int) -> list[dict[str, Any]]:
        rows = await self._call(lambda c: c.fetch(
            "SELECT * FROM incidents WHERE ($1::text IS NULL OR first_seen >= $1) "
            "AND ($2::text IS NULL OR client_ip = $2) AND ($3::text IS NULL OR rule = $3) "
            "ORDER BY first_seen DESC, id LIMIT $4 OFFSET $5",
            since, client, rule, limit, offset))
        return [{"incident_id": r["id"], "client_ip": r["client_ip"],
                 "client_mac": r["client_mac"], "device_name": r["device_name"],
                 "name": r["name"], "rule": r["rule"], "qtype": r["qtype"], "count": r["count"],
                 "first_seen": r["first_seen"], "last_seen": r["last_seen"],
                 "instance": r["instance"]} for r in rows]

    async def prune_incidents(self, before: str, keep: int) -> int:
        async def work(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                old = await conn.execute("DELETE FROM incidents WHERE last_seen < $1", before)
                over = await conn.execute(
                    "DELETE FROM incidents WHERE id NOT IN "
                    "(SELECT id FROM incidents ORDER BY first_seen DESC LIMIT $1)", keep)
            return int(old.split()[-1]) + int(over.split()[-1])
        return int(await self._call(work))

    # -- changes made by other instances -------------------------------------------------------

    async def watch(self, changed: Callable[[str], Awaitable[None]],
                    reconnected: Callable[[], Awaitable[None]],
                    up: Callable[[bool], None]) -> None:
        """Until cancelled: LISTEN for device changes and await `changed(device_id)` for each;
        when the connection is lost, say so (`up(False)`), reconnect with back-off, await
        `reconnected()` (a full reload: changes made meanwhile were not notified), then listen
        again."""
        delay = RECONNECT_SECONDS[0]
        first = True
        while True:
            lost = asyncio.Event()
            conn: asyncpg.Connection | None = None
            try:
                reload = not first or self.pool is None  # (started degraded: from the snapshot)
                if self.pool is None:
                    await self.connect()
                conn = await asyncpg.connect(**dsn_arguments(self.dsn), password=self.password,
                                             timeout=CONNECT_TIMEOUT)
                queue: asyncio.Queue[str] = asyncio.Queue()

                def notified(_conn: object, _pid: int, _channel: str, payload: str,
                             queue: asyncio.Queue[str] = queue) -> None:
                    queue.put_nowait(payload)

                def terminated(_conn: object, lost: asyncio.Event = lost) -> None:
                    lost.set()

                await conn.add_listener(CHANNEL, notified)
                conn.add_termination_listener(terminated)
                if reload:
                    self.up = True
                    up(True)
                    await reconnected()  # (after LISTEN: nothing falls in between)
                    log.info("store_reconnected", instance=self.instance)
                first = False
                delay = RECONNECT_SECONDS[0]
                while not lost.is_set():
                    getter = asyncio.ensure_future(queue.get())
                    waiter = asyncio.ensure_future(lost.wait())
                    done, pending = await asyncio.wait(
                        {getter, waiter}, timeout=COMMAND_TIMEOUT,
                        return_when=asyncio.FIRST_COMPLETED)
                    for task in pending:
                        task.cancel()
                    if getter in done:
                        await changed(getter.result())
                    elif not done:
                        await conn.execute("SELECT 1", timeout=CONNECT_TIMEOUT)  # still there?
            except Exception as exc:  # whatever it was, DNS goes on: say so, reconnect
                if self.up or (first and self.unavailable is None):
                    log.error("store_unavailable", instance=self.instance, error=_why(exc),
                              retry_seconds=delay)
                first = False
                self.up = False
                up(False)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_SECONDS[1])

    async def close(self) -> None:
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 5)
            self.pool = None


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    return str(exc) or type(exc).__name__


__all__ = ["MIGRATIONS", "PostgresStore", "read_password"]
