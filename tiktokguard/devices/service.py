"""The device lifecycle of the policy: allowlist, update, deactivate, expire; every step audited.

Each change is written to the store (device and audit entry in one transaction) and then to the
in-memory DeviceIndex, before the caller (the API) answers: the very next DNS query from that
device is decided by the new state. Changes are serialised by a lock, so the 409 check and the
write see the same state.
"""

from __future__ import annotations

import asyncio
import builtins
import ipaddress
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
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
from tiktokguard.policy.clients import DeviceIndex, IPNetwork

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
                 clock: Callable[[], datetime] = now_utc, snapshot: Path | None = None,
                 served: Callable[[], tuple[IPNetwork, ...]] | None = None) -> None:
        self.store = store
        # dns.allow_clients as in force: a device address outside it could never use the
        # resolver, so allowlisting it would only look like it worked.
        self.served = served
        self.index = index
        self.clock = clock
        # A shared (remote) store: the devices as last known, kept on this machine so that a
        # restart while the database is down still decides as before.
        self.snapshot = snapshot
        self.records: dict[str, DeviceRecord] = {}
        self._expiry_audited: set[str] = set()
        self._lock = asyncio.Lock()
        self.on_change: list[Callable[[], None]] = []  # e.g. wake the expiry watcher
        # Awaited before a change returns (and so before the API answers): DNS worker processes
        # must have the new device list by then.
        self.propagate: list[Callable[[], Awaitable[None]]] = []

    async def load(self) -> None:
        """Read every device from the store into memory and into the index (StoreUnavailable
        when it cannot be reached: what is in memory stays)."""
        records = await self.store.load_devices()
        audited = await self.store.expiry_audited()
        self._replace(records, audited)
        await self._changed()

    def _replace(self, records: builtins.list[DeviceRecord], audited: set[str]) -> None:
        self.records = {r.id: r for r in records}
        self._expiry_audited = audited
        self.index.replace_all(r.to_device() for r in records)

    async def load_snapshot(self) -> bool:
        """The devices as last known (the store is unreachable at start); False if none."""
        if self.snapshot is None:
            return False
        try:
            data = json.loads(await asyncio.to_thread(self.snapshot.read_text))
            records = [DeviceRecord.from_json(item) for item in data["devices"]]
            audited = set(data["expiry_audited"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        self._replace(records, audited)
        for callback in self.on_change:
            callback()
        return True

    async def _write_snapshot(self) -> None:
        if self.snapshot is None:
            return
        now = self.clock()
        data = json.dumps({"devices": [r.to_json(now) for r in self.records.values()],
                           "expiry_audited": sorted(self._expiry_audited)})
        path = self.snapshot

        def write() -> None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        await asyncio.to_thread(write)

    async def _changed(self) -> None:
        """Tell everyone who keeps a copy: the expiry watcher, the neighbour table, the worker
        processes and the exemption sets (awaited), the local snapshot."""
        for callback in self.on_change:
            callback()
        for hook in self.propagate:
            await hook()
        await self._write_snapshot()

    async def apply_remote(self, device_id: str) -> None:
        """Another instance (or this one) changed a device in the shared store: read it and put
        it in force here (StoreUnavailable: the watcher reloads everything once it is back)."""
        async with self._lock:
            # Read under the lock: after any change of this instance has been committed, so a
            # read can never put an older state back in force.
            found = await self.store.load_device(device_id)
            if found is None:
                return
            record, audited = found
            now = self.clock()
            known = self.records.get(record.id)
            if (known is not None and known.to_json(now) == record.to_json(now)
                    and (record.id in self._expiry_audited) == audited):
                return  # this instance's own change, already in force
            self.records[record.id] = record
            if audited:
                self._expiry_audited.add(record.id)
            else:
                self._expiry_audited.discard(record.id)
            self.index.put(record.to_device())
        await self._changed()

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

    def _check_served(self, record: DeviceRecord) -> None:
        if self.served is None:
            return
        served = self.served()
        for address in record.addresses:
            network = ipaddress.ip_network(address)
            if not any(network.version == s.version and network.subnet_of(s)  # type: ignore[arg-type]
                       for s in served):
                raise ValidationError("addresses", f"{address} is outside dns.allow_clients "
                                      f"({', '.join(str(s) for s in served)}): this resolver "
                                      "would refuse the device's queries")

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
        await self._changed()
        return record

    async def create(self, body: Any, actor: str) -> DeviceRecord:
        now = self.clock()
        record = new_device(body, "dev-" + secrets.token_hex(6), now)
        self._check_served(record)
        async with self._lock:
            self._check_conflicts(record)
            return await self._commit(record, self._audit(actor, "create", None, record, now))

    async def update(self, device_id: str, body: Any, actor: str) -> DeviceRecord:
        async with self._lock:
            before = self.get(device_id)
            now = self.clock()
            after = apply_patch(before, body, now)
            if after.addresses != before.addresses:
                self._check_served(after)
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
        done = []
        async with self._lock:
            for record in due:
                current = self.records.get(record.id)
                if current is None or current.id in self._expiry_audited:
                    continue
                audit = self._audit(SYSTEM_ACTOR, "expire", current, current, now)
                # Once across every instance sharing the store: the one that claims it audits.
                if await self.store.audit_expiry(current, audit):
                    done.append(current)
                self._expiry_audited.add(current.id)
        if done:
            await self._changed()
        return done

    def next_expiry(self) -> datetime | None:
        pending = [r.expires_at for r in self.records.values()
                   if r.active and r.expires_at is not None and r.id not in self._expiry_audited]
        return min(pending) if pending else None


__all__ = ["Conflict", "DeviceService", "NotFound", "ValidationError"]
