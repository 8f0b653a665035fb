"""Helpers for the tests that run in network namespaces they create (root and iproute2; CI has
both). Elsewhere `SKIP` says why, and those tests are skipped with that reason."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tests import reaper
from tests.daemons import communicate, exit_status, within

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    name = reaper.namespace("probe")
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:
        return f"ip netns add is not allowed here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


SKIP = _unavailable()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def admin_token(token: str) -> str:
    """The [http] line that makes `token` an admin token."""
    return (f'tokens.it = {{ role = "admin", '
            f'sha256 = "{hashlib.sha256(token.encode()).hexdigest()}" }}')


@asynccontextmanager
async def process_in(ns: str, *args: str, ready: str) -> AsyncIterator[
        asyncio.subprocess.Process]:
    """`python args` in the namespace (a process group of its own, tests/reaper.py), once a line
    of its output holds `ready`; stopped after (SIGTERM, then SIGKILL 10 s later)."""
    with tempfile.TemporaryFile() as stderr:
        proc = await reaper.spawn(
            "ip", "netns", "exec", ns, sys.executable, *args, cwd=ROOT, env=ENV,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr)

        def errors() -> str:
            stderr.seek(0)
            return stderr.read().decode(errors="replace")[-4000:]

        try:
            assert proc.stdout is not None
            try:
                async with asyncio.timeout(20):
                    while ready.encode() not in (line := await proc.stdout.readline()):
                        if not line:
                            raise AssertionError(f"{args} ended: {errors()}")
            except TimeoutError:
                raise AssertionError(f"{args}: no {ready!r} within 20 s: {errors()}") from None
            yield proc
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await exit_status(proc, 10, f"{args} after SIGTERM")
                except AssertionError as exc:
                    exc.add_note(errors())
                    raise


async def wait_event(proc: asyncio.subprocess.Process, name: str) -> dict[str, object]:
    """The next JSON log line of a daemon started by process_in whose event is `name`."""
    assert proc.stdout is not None

    async def wait() -> dict[str, object]:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            record = json.loads(line)
            if record.get("event") == name:
                return dict(record)
        raise AssertionError(f"daemon ended before {name}")

    return await within(20, wait(), f"the daemon's {name!r} event")


async def exec_in(ns: str, *argv: str, stdin: str | None = None,
                  env: dict[str, str] | None = None, seconds: float = 30) -> str:
    """Run a command in the namespace; its output (it must succeed within seconds)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, *argv, cwd=ROOT, env=dict(ENV, **(env or {})),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await communicate(proc, stdin.encode() if stdin is not None else None, seconds,
                                 f"{argv} in {ns}")
    assert proc.returncode == 0, f"{argv}: {err.decode()}"
    return out.decode()


async def python_in(ns: str, *args: str, env: dict[str, str] | None = None) -> str:
    return await exec_in(ns, sys.executable, *args, env=env)


async def devices_in(ns: str, api: str, token: str, *args: str) -> dict[str, Any]:
    """`tiktokguard devices --json ARGS` in the namespace, as IT would run it; the JSON."""
    out = await python_in(ns, "-m", "tiktokguard", "devices", "--api", api, "--json", *args,
                          env={"TIKTOKGUARD_TOKEN": token})
    return dict(json.loads(out))
