"""Extra DNS worker processes (`dns.workers` > 1): the query path on more cores.

The main process keeps the control plane (HTTP API, device store, incidents, sd_notify) and
answers DNS itself; each extra worker answers DNS only, on the same addresses (SO_REUSEPORT: the
kernel spreads clients over the sockets). A worker is a DnsCore and a pipe to the main process:

  main → worker   ("devices", [...], seq)  the allowlisted devices, after every change
                  ("reload", Config, seq)  the config the main process put in force: apply it,
                                           and re-read the lists (after the main process did)
                  ("report", None, seq)    send your counters now (a scrape, an incident list)
                  ("stop", None, 0)        answer what is in flight, then exit
  worker → main   ("ready", index)         listeners bound
                  ("stats", {...})         its metric counters (cumulative); every second too
                  ("blocked", [...])       blocked queries summed per (client, rule)
                  ("ack", seq)             a request has been carried out

The main process waits (bounded) for every worker's ack: a device change is in force in every
process before the API answers, a scrape sees every process's counts, and incidents are
aggregated in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from tiktokguard.config import Config
from tiktokguard.core import DnsCore
from tiktokguard.incidents import BlockedBatch
from tiktokguard.logs import get_logger
from tiktokguard.metrics import Metrics, QueryStats
from tiktokguard.neighbours import NeighbourTable
from tiktokguard.policy.clients import Device, DeviceIndex
from tiktokguard.policy.domains import ListError

REPORT_SECONDS = 1.0
START_SECONDS = 30.0
DRAIN_SECONDS = 5.0
log = get_logger("tiktokguard.workers")


def device_snapshot(devices: DeviceIndex) -> list[tuple[Any, ...]]:
    return [(d.id, d.name, tuple(str(n) for n in d.addresses), d.macs, d.active, d.expires_at)
            for d in devices.devices.values()]


def devices_from_snapshot(snapshot: list[tuple[Any, ...]]) -> list[Device]:
    import ipaddress

    return [Device(i, name, tuple(ipaddress.ip_network(a) for a in addresses), tuple(macs),
                   active, expires_at)
            for i, name, addresses, macs, active, expires_at in snapshot]


# -- in the worker process ---------------------------------------------------------------------


def worker_main(config: Config, index: int, conn: Connection,
                devices: list[tuple[Any, ...]]) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    from tiktokguard import logs

    logs.configure(json=True)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(_serve(config, index, conn, devices))


async def _serve(config: Config, index: int, conn: Connection,
                 snapshot: list[tuple[Any, ...]]) -> None:
    metrics = Metrics()
    devices = DeviceIndex(devices_from_snapshot(snapshot))
    batch = BlockedBatch()
    neighbours = (NeighbourTable(metrics, lambda: devices.has_macs)
                  if config.policy.neighbour_table else None)
    core = DnsCore(config, metrics, devices, batch, neighbours, time.time)
    await core.listen()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    tasks = []
    if neighbours is not None:
        tasks.append(loop.create_task(neighbours.run()))
    if core.backstop is not None:
        tasks.append(loop.create_task(core.backstop.run()))
        # (no `changed` hook needed: a device change arrives as a message, handled below)

    async def reload(new: Config) -> None:
        if core.backstop is not None:
            core.backstop.request_check()
        core.apply(new)  # parsed and checked by the main process
        with contextlib.suppress(ListError):  # the main process has said why; lists are kept
            await core.reload_lists()

    async def reload_and_ack(new: Config, seq: int) -> None:
        await reload(new)
        with contextlib.suppress(OSError, ValueError):
            conn.send(("ack", seq))

    def on_message() -> None:
        try:
            kind, payload, seq = conn.recv()
        except (EOFError, OSError):
            stop.set()  # the main process is gone
            return
        if kind == "devices":
            devices.replace_all(devices_from_snapshot(payload))
            if neighbours is not None:
                neighbours.changed()
        elif kind == "report":
            _report(conn, metrics, batch)
        elif kind == "reload":
            tasks.append(loop.create_task(reload_and_ack(payload, seq)))
            return  # acknowledged once the reload is done
        elif kind == "stop":
            stop.set()
            return
        with contextlib.suppress(OSError, ValueError):
            conn.send(("ack", seq))

    loop.add_reader(conn.fileno(), on_message)
    conn.send(("ready", index))
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_SECONDS):
                    await stop.wait()
            _report(conn, metrics, batch)
    finally:
        loop.remove_reader(conn.fileno())
        await core.stop(DRAIN_SECONDS)
        _report(conn, metrics, batch)
        for task in tasks:
            task.cancel()


def _report(conn: Connection, metrics: Metrics, batch: BlockedBatch) -> None:
    with contextlib.suppress(OSError, ValueError):
        conn.send(("stats", metrics.stats.snapshot()))
        blocked = batch.take()
        if blocked:
            conn.send(("blocked", blocked))


# -- in the main process -----------------------------------------------------------------------


@dataclass
class Worker:
    index: int
    process: BaseProcess
    conn: Connection
    stats: QueryStats


class WorkerPool:
    """The main process's view of its workers: start, message, restart, stop."""

    def __init__(self, count: int, config: Callable[[], Config],
                 devices: Callable[[], DeviceIndex], stats: QueryStats,
                 blocked: Callable[[tuple[Any, ...]], None]) -> None:
        """count: DNS processes in all (this one included); config: the config in force;
        devices: the allowlisted devices; stats: this process's counters, which carry the
        workers' (`others`); blocked: takes a worker's summed blocked-query entry."""
        self.count = count
        self.config = config
        self.devices = devices
        self.stats = stats
        self.blocked = blocked
        self.workers: dict[int, Worker] = {}
        self.context = multiprocessing.get_context("spawn")
        self.stopping = False
        self._ready: dict[int, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = 0
        self._waiting: dict[tuple[int, int], asyncio.Future[None]] = {}

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn(i) for i in range(1, self.count)))

    async def _spawn(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        parent, child = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=worker_main, name=f"tiktokguard-dns-{index}", daemon=True,
            args=(self.config(), index, child, device_snapshot(self.devices())))
        process.start()
        child.close()
        worker = Worker(index, process, parent, QueryStats())
        self.workers[index] = worker
        self._ready[index] = loop.create_future()
        loop.add_reader(parent.fileno(), self._on_message, worker)
        try:
            async with asyncio.timeout(START_SECONDS):
                await self._ready[index]
        except TimeoutError:
            raise RuntimeError(f"DNS worker {index} did not start") from None

    def _on_message(self, worker: Worker) -> None:
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            self._lost(worker)
            return
        if kind == "ready":
            future = self._ready.get(worker.index)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind == "stats":
            worker.stats = QueryStats.from_snapshot(payload)
            self.stats.others = [w.stats for w in self.workers.values()]
        elif kind == "blocked":
            for entry in payload:
                self.blocked(entry)
        elif kind == "ack":
            future = self._waiting.pop((worker.index, payload), None)
            if future is not None and not future.done():
                future.set_result(None)

    def _lost(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.conn.fileno())
        worker.conn.close()
        future = self._ready.get(worker.index)
        if future is not None and not future.done():
            future.set_exception(RuntimeError(f"DNS worker {worker.index} exited on start"))
            return
        if not self.stopping:
            # Keep its counts (they are cumulative) by folding them into the main process's.
            self.stats.absorb(worker.stats)
            del self.workers[worker.index]
            self.stats.others = [w.stats for w in self.workers.values()]
            log.error("dns_worker_died", worker=worker.index,
                      exitcode=worker.process.exitcode)
            task = loop.create_task(self._respawn(worker.index))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _respawn(self, index: int) -> None:
        await asyncio.sleep(1.0)  # do not spin if it dies at once again
        if self.stopping:
            return
        try:
            await self._spawn(index)
            log.info("dns_worker_restarted", worker=index)
        except RuntimeError as exc:
            log.error("dns_worker_restart_failed", worker=index, error=str(exc))

    def broadcast(self, kind: str, payload: Any = None) -> None:
        """Send to every worker without waiting."""
        for worker in self.workers.values():
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send((kind, payload, 0))

    async def request(self, kind: str, payload: Any = None, seconds: float = 2.0) -> bool:
        """Send to every worker and wait (bounded) until each has carried it out."""
        if not self.workers:
            return True
        self._seq += 1
        loop = asyncio.get_running_loop()
        pending = []
        for worker in self.workers.values():
            future = loop.create_future()
            self._waiting[worker.index, self._seq] = future
            pending.append(future)
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send((kind, payload, self._seq))
        _done, late = await asyncio.wait(pending, timeout=seconds)
        for future in late:
            future.cancel()
        if late:
            log.warning("dns_worker_slow", request=kind, late=len(late))
        return not late

    async def devices_changed(self) -> None:
        await self.request("devices", device_snapshot(self.devices()))

    async def report(self) -> None:
        """Fresh counters and blocked-query batches from every worker."""
        await self.request("report", seconds=1.0)

    async def stop(self) -> None:
        self.stopping = True
        self.broadcast("stop")
        for future in self._waiting.values():
            future.cancel()
        for worker in list(self.workers.values()):
            await asyncio.to_thread(worker.process.join, DRAIN_SECONDS + 2)
            if worker.process.is_alive():
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 2)
