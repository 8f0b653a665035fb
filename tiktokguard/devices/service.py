"""The device lifecycle of the policy: allowlist, update, deactivate, expire; every step audited.

Each change is written to the store (device and audit entry in one transaction) and then to the
in-memory DeviceIndex, before the caller (the API) answers: the very next DNS query from that
device is decided by the new state. Changes are serialised by a lock, so the 409 check and the
write see the same state.
"""

from __future__ import annotations

import asyncio
import builtins
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from tiktokguard.devices.model import (
    DeviceRecord,
    ValidationError,
    apply_patch,
    conflicts,
    format_time,
    new_device,
    now_utc,
)
from tiktokguard.devices.store import Store
from tiktokguard.policy.clients import DeviceIndex

SYSTEM_ACTOR = "system"


class NotFound(Exception):
    pass


class Conflict(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class DeviceService:
    def __init__(self, store: Store, index: DeviceIndex,
                 clock: Callable[[], datetime] = now_utc) -> None:
        self.store = store
        self.index = index
        self.clock = clock
        self.records: dict[str, DeviceRecord] = {}
        self._expiry_audited: set[str] = set()
        self._lock = asyncio.Lock()
        self.on_change: list[Callable[[], None]] = []  # e.g. wake the expiry watcher
        # Awaited before a change returns (and so before the API answers): DNS worker processes
        # must have the new device list by then.
        self.propagate: list[Callable[[], Awaitable[None]]] = []

    async def load(self) -> None:
        """Read every device from the store into memory and into the index."""
        records = await self.store.load_devices()
        self.records = {r.id: r for r in records}
        self._expiry_audited = await self.store.expiry_audited()
        self.index.replace_all(r.to_device() for r in records)

    def list(self, active: bool | None = None) -> list[DeviceRecord]:
        return [r for r in self.records.values() if active is None or r.active == active]

    def get(self, device_id: str) -> DeviceRecord:
        record = self.records.get(device_id)
        if record is None:
            raise NotFound(device_id)
        return record

    def _audit(self, actor: str, action: str, before: DeviceRecord | None,
               after: DeviceRecord | None, now: datetime) -> dict[str, Any]:
        device_id = (after or before).id  # type: ignore[union-attr]
        return {"at": format_time(now), "actor": actor, "action": action, "device_id": device_id,
                "before": before.to_json(now) if before else None,
                "after": after.to_json(now) if after else None}

    def _check_conflicts(self, record: DeviceRecord) -> None:
        clash = conflicts(record, list(self.records.values()))
        if clash is not None:
            raise Conflict(*clash)

    async def _commit(self, record: DeviceRecord, audit: dict[str, Any],
                      expiry_audited: bool | None = None) -> DeviceRecord:
        await self.store.save_device(record, audit, expiry_audited)
        self.records[record.id] = record
        if expiry_audited is not None:
            if expiry_audited:
                self._expiry_audited.add(record.id)
            else:
                self._expiry_audited.discard(record.id)
        self.index.put(record.to_device())
        for callback in self.on_change:
            callback()
        for hook in self.propagate:
            await hook()
        return record

    async def create(self, body: Any, actor: str) -> DeviceRecord:
        now = self.clock()
        record = new_device(body, "dev-" + secrets.token_hex(6), now)
        async with self._lock:
            self._check_conflicts(record)
            return await self._commit(record, self._audit(actor, "create", None, record, now))

    async def update(self, device_id: str, body: Any, actor: str) -> DeviceRecord:
        async with self._lock:
            before = self.get(device_id)
            now = self.clock()
            after = apply_patch(before, body, now)
            self._check_conflicts(after)
            if after.active and not before.active:
                action = "reactivate"
            elif before.active and not after.active:
                action = "deactivate"
            else:
                action = "update"
            # A new expiry time in the future is a new term: its end is audited again.
            reset = None
            if after.expires_at != before.expires_at and not after.expired(now):
                reset = False
            return await self._commit(after, self._audit(actor, action, before, after, now), reset)

    async def deactivate(self, device_id: str, actor: str) -> DeviceRecord:
        async with self._lock:
            before = self.get(device_id)
            if not before.active:
                return before  # already deactivated: nothing changes, nothing to audit
            now = self.clock()
            after = apply_patch(before, {"active": False}, now)
            return await self._commit(after, self._audit(actor, "deactivate", before, after, now))

    async def audit_expiries(self) -> builtins.list[DeviceRecord]:
        """Audit, once, each active device whose expires_at has passed. The index already stops
        exempting it at that moment (expiry is checked per query); this only documents it."""
        now = self.clock()
        due = [r for r in self.records.values()
               if r.active and r.expired(now) and r.id not in self._expiry_audited]
        async with self._lock:
            for record in due:
                current = self.records.get(record.id)
                if current is None or current.id in self._expiry_audited:
                    continue
                await self._commit(current, self._audit(SYSTEM_ACTOR, "expire", current, current,
                                                        now), expiry_audited=True)
        return due

    def next_expiry(self) -> datetime | None:
        pending = [r.expires_at for r in self.records.values()
                   if r.active and r.expires_at is not None and r.id not in self._expiry_audited]
        return min(pending) if pending else None


__all__ = ["Conflict", "DeviceService", "NotFound", "ValidationError"]
