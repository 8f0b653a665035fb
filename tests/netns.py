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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    name = f"tgprobe{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns add is not allowed here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


SKIP = _unavailable()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def admin_token(token: str) -> str:
    """The [http] line that makes `token` an admin token."""
    return (f'tokens.it = {{ role = "admin", '
            f'sha256 = "{hashlib.sha256(token.encode()).hexdigest()}" }}')


@asynccontextmanager
async def process_in(ns: str, *args: str, ready: str) -> AsyncIterator[
        asyncio.subprocess.Process]:
    """`python args` in the namespace, once a line of its output holds `ready`; stopped after."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, *args, cwd=ROOT, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        async with asyncio.timeout(20):
            while ready.encode() not in (line := await proc.stdout.readline()):
                if not line:
                    raise AssertionError(f"{args} ended: {(await proc.stderr.read()).decode()}")
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def wait_event(proc: asyncio.subprocess.Process, name: str) -> dict[str, object]:
    """The next JSON log line of a daemon started by process_in whose event is `name`."""
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError(f"daemon ended before {name}")
            record = json.loads(line)
            if record.get("event") == name:
                return dict(record)


async def exec_in(ns: str, *argv: str, stdin: str | None = None,
                  env: dict[str, str] | None = None) -> str:
    """Run a command in the namespace; its output (it must succeed)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, *argv, cwd=ROOT, env=dict(ENV, **(env or {})),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    assert proc.returncode == 0, f"{argv}: {err.decode()}"
    return out.decode()


async def python_in(ns: str, *args: str, env: dict[str, str] | None = None) -> str:
    return await exec_in(ns, sys.executable, *args, env=env)


async def devices_in(ns: str, api: str, token: str, *args: str) -> dict[str, Any]:
    """`tiktokguard devices --json ARGS` in the namespace, as IT would run it; the JSON."""
    out = await python_in(ns, "-m", "tiktokguard", "devices", "--api", api, "--json", *args,
                          env={"TIKTOKGUARD_TOKEN": token})
    return dict(json.loads(out))
