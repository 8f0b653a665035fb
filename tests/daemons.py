"""Processes the tests start and wait on, with every wait bounded.

`serve()` starts `tiktokguard serve` (or any command that logs JSON lines) as a process of its
own (tests/reaper.py: its own process group, ended with the run), reads its output as it comes
(a chatty process never blocks on a full pipe; its stderr goes to a temporary file) and ends it
after the block. `within()` and `exit_status()` put a bound on the other waits, each failing
with what did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests import reaper

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
D = TypeVar("D", bound="DaemonProcess")


async def within(seconds: float, awaitable: Awaitable[T], what: str) -> T:
    """awaitable's result; an AssertionError naming `what` if it takes longer than seconds."""
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError:
        raise AssertionError(f"{what}: not within {seconds:g} s") from None


async def exit_status(proc: asyncio.subprocess.Process, seconds: float = 15,
                      what: str = "the process") -> int:
    """proc's exit status once it has ended; if it has not within seconds, it is killed and
    the test fails saying so."""
    try:
        async with asyncio.timeout(seconds):
            return await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.wait_for(proc.wait(), 5)
        raise AssertionError(f"{what} (pid {proc.pid}) had not exited {seconds:g} s later; "
                             "killed") from None


async def communicate(proc: asyncio.subprocess.Process, stdin: bytes | None = None,
                      seconds: float = 30, what: str = "the command") -> tuple[bytes, bytes]:
    """proc.communicate(stdin), within seconds (else it is killed and the test fails)."""
    try:
        async with asyncio.timeout(seconds):
            return await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await exit_status(proc, 5, f"{what}, killed")
        raise AssertionError(f"{what}: not done within {seconds:g} s") from None


class DaemonProcess:
    """A running process that logs one JSON object a line on stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Any, port: int = 0) -> None:
        self.proc = proc
        self.port = port
        self.events: list[dict[str, Any]] = []  # every record so far, in order
        self._cursor = 0  # how many of them event() has looked at
        self._stderr = stderr
        self._changed = asyncio.Event()
        self._eof = False
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(line))
                self._changed.set()
        finally:
            self._eof = True
            self._changed.set()

    def stderr(self) -> str:
        self._stderr.seek(0)
        return str(self._stderr.read().decode(errors="replace"))[-4000:]

    async def event(self, name: str, seconds: float = 15) -> dict[str, Any]:
        """The next record whose event is name (after the last one this returned)."""
        try:
            async with asyncio.timeout(seconds):
                while True:
                    while self._cursor < len(self.events):
                        record = self.events[self._cursor]
                        self._cursor += 1
                        if record.get("event") == name:
                            return record
                    if self._eof:
                        raise AssertionError(f"the daemon ended before {name!r} (status "
                                             f"{await self.proc.wait()}): {self.stderr()}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            seen = [r.get("event") for r in self.events[-10:]]
            raise AssertionError(f"no {name!r} from the daemon within {seconds:g} s (last "
                                 f"events: {seen}); stderr: {self.stderr()}") from None

    async def stop(self, sig: int = signal.SIGTERM, seconds: float = 15) -> int:
        """Send sig; the exit status, within seconds."""
        self.proc.send_signal(sig)
        return await self.exited(seconds, f"after {signal.Signals(sig).name}")

    async def exited(self, seconds: float = 15, when: str = "") -> int:
        return await exit_status(self.proc, seconds, f"the daemon {when}".strip())

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # with its workers, if any
            await exit_status(self.proc, 10, "the daemon, killed")
        await within(5, self._reader, "the daemon's output to end")


@asynccontextmanager
async def serve(*args: str, cwd: Path, env: dict[str, str] | None = None, port: int = 0,
                ready: str | None = "started", seconds: float = 20,
                kind: type[D] = DaemonProcess  # type: ignore[assignment]
                ) -> AsyncIterator[D]:
    """`python -m tiktokguard ARGS` (ARGS starting with "-": `serve --log-format json ARGS`),
    once it has logged `ready`; killed after the block if still running."""
    argv = list(args) if args and not args[0].startswith("-") else [
        "serve", "--log-format", "json", *args]
    with tempfile.TemporaryFile() as stderr:
        proc = await reaper.spawn(
            sys.executable, "-m", "tiktokguard", *argv, cwd=cwd,
            env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr)
        running = kind(proc, stderr, port)
        try:
            if ready is not None:
                await running.event(ready, seconds)
            yield running
        finally:
            await running.close()
