"""What the suite starts, it ends: even when pytest itself is killed.

- Every process a test starts carries `TIKTOKGUARD_TEST_RUN=<pid>.<start time>` of the pytest
  process that started it (set in os.environ when conftest is imported, so inherited by
  everything started after: daemons, servers, what runs in network namespaces, PostgreSQL).
- Daemons and servers are started by `spawn()` / `popen()` in a process group of their own.
- Network namespaces are named by `namespace()` (`tg-<kind>-<run>`), PostgreSQL folders
  `tg-pg-<run>-*` in the temporary folder.

At the end of a run (atexit, and on SIGTERM or SIGHUP, which would otherwise end pytest without
cleaning up) this run's leftovers are ended: its process groups, every process carrying its
mark, its namespaces and its PostgreSQL folders. At the start of a run, the same is done for
every earlier run that is no longer alive (one killed with SIGKILL, for example). Nothing that
does not carry the suite's mark is touched, and a run that is still alive is left alone.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

MARK = "TIKTOKGUARD_TEST_RUN"
_NAMESPACE = re.compile(r"^tg-[a-z0-9]+-(\d+\.\d+)$")
_PG_FOLDER = re.compile(r"^tg-pg-(\d+\.\d+)-")


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, a name no later
    process can take."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; fields after ")" start at 3


RUN = f"{os.getpid()}.{_start_time(os.getpid())}"
_groups: set[int] = set()  # process groups spawn() and popen() started


def alive(run: str) -> bool:
    pid, _, start = run.partition(".")
    return pid.isdigit() and _start_time(int(pid)) == start


def claim() -> None:
    """Mark everything started from now on as this run's."""
    os.environ[MARK] = RUN


def namespace(kind: str) -> str:
    """A network namespace name for this run (kind: a few lower-case letters or digits)."""
    assert re.fullmatch(r"[a-z0-9]+", kind), kind
    return f"tg-{kind}-{RUN}"


def pg_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix=f"tg-pg-{RUN}-"))


async def spawn(*argv: str, **options: Any) -> asyncio.subprocess.Process:
    """asyncio.create_subprocess_exec in a process group of its own, ended with the run."""
    proc = await asyncio.create_subprocess_exec(*argv, start_new_session=True, **options)
    _groups.add(proc.pid)
    return proc


def popen(argv: list[str], **options: Any) -> subprocess.Popen[bytes]:
    """subprocess.Popen in a process group of its own, ended with the run."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(argv, start_new_session=True, **options)
    _groups.add(proc.pid)
    return proc


def _marked() -> Iterator[tuple[int, str]]:
    """(pid, run) of every process carrying the suite's mark."""
    needle = f"{MARK}=".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(needle):
                yield int(entry.name), item[len(needle):].decode(errors="replace")
                break


def end(which: Callable[[str], bool]) -> list[str]:
    """End the leftovers of every run `which` selects; what was ended, a line each."""
    ended: list[str] = []
    if which(RUN):
        leaders = {pid for pid, run in _marked() if run == RUN}
        for group in sorted(_groups):
            # Only a group whose leader still carries this run's mark (no reused number).
            if group in leaders:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
                    ended.append(f"process group {group}")
        _groups.clear()
    killed: set[int] = set()
    for _ in range(5):  # a process may fork while its run is ended: look again
        found = [(pid, run) for pid, run in _marked() if which(run) and pid not in killed]
        if not found:
            break
        for pid, run in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                ended.append(f"process {pid} of run {run}")
        deadline = time.monotonic() + 2  # until they are gone (a zombie has no environ)
        while time.monotonic() < deadline and any(pid in killed for pid, _ in _marked()):
            time.sleep(0.05)
    if shutil.which("ip") is not None and os.geteuid() == 0:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                     timeout=10).stdout
            for line in listing.splitlines():
                name = line.split()[0] if line.split() else ""
                match = _NAMESPACE.match(name)
                if match and which(match.group(1)):
                    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
                    ended.append(f"network namespace {name}")
    for folder in Path(tempfile.gettempdir()).glob("tg-pg-*"):
        match = _PG_FOLDER.match(folder.name)
        if match and which(match.group(1)):
            shutil.rmtree(folder, ignore_errors=True)
            ended.append(f"PostgreSQL folder {folder}")
    return ended


def sweep_earlier_runs() -> list[str]:
    """End what runs that are no longer alive left behind."""
    return end(lambda run: run != RUN and not alive(run))


def end_this_run() -> list[str]:
    return end(lambda run: run == RUN)


def _at_exit() -> None:
    ended = end_this_run()
    if ended:
        print(f"tests/reaper.py: ended what this run left: {', '.join(ended)}", file=sys.stderr)


def _on_signal(number: int, _frame: FrameType | None) -> None:
    _at_exit()
    signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)  # end as the signal would have


def install() -> None:
    """At the run's start: sweep earlier runs, then end this one's leftovers at its exit."""
    claim()
    ended = sweep_earlier_runs()
    if ended:
        print(f"tests/reaper.py: ended what an earlier run left: {', '.join(ended)}",
              file=sys.stderr)
    atexit.register(_at_exit)
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _on_signal)
