"""`tiktokguard migrate --from-sqlite DIR`: a single box's state (devices, audit trail, incidents,
API token hashes) copied into the shared PostgreSQL store, in one transaction. The target must
hold no devices and no audit entries yet: a second run never duplicates a trail."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg

from tiktokguard.devices.pgstore import PostgresStore
from tiktokguard.devices.store import SqliteStore


class MigrateError(Exception):
    """Why nothing was copied; the CLI prints it and exits 2."""


async def copy_sqlite(db_file: Path, target: PostgresStore) -> dict[str, int]:
    """Copy every row; returns how many of each. MigrateError, StoreUnavailable."""
    if not await asyncio.to_thread(db_file.is_file):
        raise MigrateError(f"{db_file}: no such state database")
    # Opening it applies the SQLite migrations first: an older layout is brought up to date.
    source = await SqliteStore.open(db_file)
    await source.close()
    tables = await asyncio.to_thread(_read, db_file)

    async def work(conn: asyncpg.Connection) -> dict[str, int]:
        async with conn.transaction():
            held = await conn.fetchval("SELECT (SELECT count(*) FROM devices) + "
                                       "(SELECT count(*) FROM audit)")
            if held:
                raise MigrateError("the PostgreSQL store already holds devices or audit "
                                   "entries; nothing was copied")
            for r in tables["devices"]:
                await conn.execute(
                    "INSERT INTO devices VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, "
                    "$12, $13)", r["id"], r["name"], r["addresses"], r["macs"], r["custodian"],
                    r["supervisor"], r["ticket"], r["location"], r["expires_at"],
                    bool(r["active"]), r["created_at"], r["updated_at"],
                    bool(r["expiry_audited"]))
            for r in sorted(tables["audit"], key=lambda row: row["seq"]):
                await conn.execute(
                    "INSERT INTO audit (at, actor, action, device_id, before, after, instance) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7)", r["at"], r["actor"], r["action"],
                    r["device_id"], _json(r["before"]), _json(r["after"]),
                    r.get("instance") or target.instance)
            for r in tables["api_tokens"]:
                await conn.execute(
                    "INSERT INTO api_tokens VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
                    r["name"], r["role"], r["sha256"], r["created_at"])
            for r in tables["incidents"]:
                await conn.execute(
                    "INSERT INTO incidents VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
                    "ON CONFLICT (id) DO NOTHING", r["id"], r["client_ip"], r["client_mac"],
                    r["device_name"], r["name"], r["rule"], r["qtype"], r["count"],
                    r["first_seen"], r["last_seen"], r.get("instance") or target.instance)
            return {name: len(rows) for name, rows in tables.items()}
    result: dict[str, int] = await target._call(work)
    return result


def _read(db_file: Path) -> dict[str, list[dict[str, Any]]]:
    db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return {name: [dict(r) for r in db.execute(f"SELECT * FROM {name}")]
                for name in ("devices", "audit", "api_tokens", "incidents")}
    finally:
        db.close()


def _json(text: Any) -> str | None:
    return None if text is None else json.dumps(json.loads(text))
